"""Step backends: how a group of decoder layers (a student layer, or the teacher block it replaced) takes a
decode step. `native`: the C++ kernel's `LayerStack` (fp32 CPU Llama-style layers, native kernels on);
`torch_layers`: the layers' own forward (any device, dtype and architecture). Chosen once per group."""

from __future__ import annotations

from torch import nn

from services.engine.backends.native import NativeStep, native_step
from services.engine.backends.torch_layers import LayerStep


def steps_for(family, layers: list[nn.Module]) -> tuple[LayerStep, LayerStep | NativeStep]:
    """(prefill, decode) of these layers of `family`, built once per family and group (the kernel's stack is
    made once, not once per batch)."""
    built = family.__dict__.setdefault("_boomerang_steps", {})
    key = tuple(id(layer) for layer in layers)  # the pair's own layers: they live as long as the family
    if key not in built:
        prefill = LayerStep(layers, family.spec.attention)
        built[key] = (prefill, native_step(layers, family.teacher.config) or prefill)
    return built[key]
