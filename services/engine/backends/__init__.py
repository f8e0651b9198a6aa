"""Step backends: how a group of decoder layers (a student layer, or the teacher block it replaced) takes a
decode step. `native`: the C++ kernel's `LayerStack` (fp32 CPU Llama-style layers, native kernels on);
`torch_layers`: the layers' own forward (any device, dtype and architecture). Chosen once per group; a group
with the native backend prefills short prompts through it too (`short_prompts`)."""

from __future__ import annotations

from torch import nn

from services.engine.backends.native import NativeStep, native_step
from services.engine.backends.short_prompts import ShortPrompts
from services.engine.backends.torch_layers import LayerStep


def steps_for(family, layers: list[nn.Module]) -> tuple[LayerStep | ShortPrompts, LayerStep | NativeStep]:
    """(prefill, decode) of these layers of `family`, built once per family and group (the kernel's stack is
    made once, not once per batch)."""
    built = family.__dict__.setdefault("_boomerang_steps", {})
    key = tuple(id(layer) for layer in layers)  # the pair's own layers: they live as long as the family
    if key not in built:
        stock = LayerStep(layers, family.spec.attention)
        native = native_step(layers, family.teacher.config)
        built[key] = (ShortPrompts(native, stock), native) if native is not None else (stock, stock)
    return built[key]
