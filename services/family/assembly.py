"""Assemble a variant module from a `VariantPlan` by referencing the teacher's and student's own modules.

No weight is copied: a variant is a thin `*ForCausalLM` shell built on the meta device with no layers,
whose submodules are then pointed at the shared ones.
"""

from __future__ import annotations

import copy
from functools import cache

import torch
from torch import nn

from services.family.architectures import PER_LAYER_CONFIG_FIELDS, ArchitectureSpec, get_path, set_path
from services.family.compat import cache_argument_name
from services.family.kv_slots import SlotCache
from services.family.plan import STUDENT, TEACHER, VariantPlan


class VariantMixin:
    """Gives a shared-module variant its own slot-addressed KV cache in `forward` and `generate`."""

    boomerang_plan: VariantPlan
    boomerang_slots: dict[int, int]

    def new_cache(self) -> SlotCache:
        return SlotCache(self.config, self.boomerang_slots)

    def _with_cache(self, kwargs: dict, default_use_cache: bool) -> dict:
        """Adds a fresh slot cache unless the caller passed a cache or turned caching off."""
        name = cache_argument_name(type(self))
        has_cache = kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None
        use_cache = kwargs.get("use_cache")
        if not has_cache and (use_cache if use_cache is not None else default_use_cache):
            kwargs[name] = self.new_cache()
        return kwargs

    def forward(self, *args, **kwargs):
        return super().forward(*args, **self._with_cache(kwargs, self.config.use_cache))

    def generate(self, *args, **kwargs):
        config = kwargs.get("generation_config") or self.generation_config
        return super().generate(*args, **self._with_cache(kwargs, config.use_cache is not False))


@cache
def variant_class(model_class: type) -> type:
    """`Boomerang<Model>ForCausalLM`: the architecture's own class with `VariantMixin` in front."""
    return type(f"Boomerang{model_class.__name__}", (VariantMixin, model_class), {})


def attention_slot(layer: nn.Module, spec: ArchitectureSpec) -> int:
    return get_path(layer, spec.attention).layer_idx


def variant_config(plan: VariantPlan, models: dict[str, nn.Module]):
    """The config of the variant: the head's config with per-layer fields following the layers."""
    config = copy.deepcopy(models[plan.head].config)
    config.num_hidden_layers = plan.num_layers
    for field in PER_LAYER_CONFIG_FIELDS:
        values = {source: getattr(model.config, field, None) for source, model in models.items()}
        if all(v is not None for v in values.values()):
            setattr(config, field, [values[ref.source][ref.index] for ref in plan.layers])
    return config


def _meta_template(model_class: type, config) -> nn.Module:
    """A layer-less instance of the variant class on the meta device: built once per family, then cloned."""
    shell_config = copy.copy(config)
    shell_config.num_hidden_layers = 0
    for field in PER_LAYER_CONFIG_FIELDS:
        if getattr(shell_config, field, None) is not None:
            setattr(shell_config, field, [])
    with torch.device("meta"):
        return variant_class(model_class)(shell_config).train(False)


def _clone_shell(template: nn.Module, config, spec: ArchitectureSpec) -> nn.Module:
    """A shallow clone of the template with its own submodule tables (so swapping modules leaves it intact)."""
    shell = copy.copy(template)
    shell._modules = dict(template._modules)
    base = copy.copy(get_path(template, spec.base))
    base._modules = dict(base._modules)
    set_path(shell, spec.base, base)
    shell.config = base.config = config
    if hasattr(base, "has_sliding_layers"):  # Qwen2/Qwen3 read it from the config at init: the template has no layers
        base.has_sliding_layers = "sliding_attention" in (getattr(config, "layer_types", None) or [])
    return shell


def assemble_variant(plan: VariantPlan, teacher: nn.Module, student: nn.Module, spec: ArchitectureSpec,
                     template: nn.Module | None = None) -> nn.Module:
    """A module whose layers, embeddings, norm, rotary embedding and head are the pair's own."""
    models = {TEACHER: teacher, STUDENT: student}
    config = variant_config(plan, models)
    template = template if template is not None else _meta_template(type(models[plan.head]), config)
    shell = _clone_shell(template, config, spec)
    layers = [get_path(models[ref.source], spec.layers)[ref.index] for ref in plan.layers]
    set_path(shell, spec.layers, nn.ModuleList(layers))
    set_path(shell, spec.embed, get_path(models[plan.embed], spec.embed))
    set_path(shell, spec.norm, get_path(models[plan.norm], spec.norm))
    set_path(shell, spec.rotary, get_path(models[plan.rotary], spec.rotary))
    set_path(shell, spec.head, get_path(models[plan.head], spec.head))
    shell.generation_config = copy.deepcopy(models[plan.head].generation_config)
    shell.boomerang_plan = plan
    shell.boomerang_slots = {attention_slot(layer, spec): i for i, layer in enumerate(layers)}
    return shell


def assemble_layers(model: nn.Module, layers: list[nn.Module], config_layers: list[int], spec: ArchitectureSpec,
                    template: nn.Module | None = None) -> nn.Module:
    """A variant of one model over any decoder layers (its own or new ones, each with a unique KV slot) and its
    own embeddings, norm, rotary embedding and head; `config_layers` names the model's layer whose per-layer
    config fields each layer takes."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(layers)
    for field in PER_LAYER_CONFIG_FIELDS:
        if getattr(config, field, None) is not None:
            setattr(config, field, [getattr(model.config, field)[i] for i in config_layers])
    template = template if template is not None else _meta_template(type(model), config)
    shell = _clone_shell(template, config, spec)
    set_path(shell, spec.layers, nn.ModuleList(layers))
    for path in (spec.embed, spec.norm, spec.rotary, spec.head):
        set_path(shell, path, get_path(model, path))
    shell.generation_config = copy.deepcopy(model.generation_config)
    shell.boomerang_slots = {attention_slot(layer, spec): i for i, layer in enumerate(layers)}
    return shell


def make_template(teacher: nn.Module, student: nn.Module) -> nn.Module:
    """The reusable meta template for a pair (teacher and student share one model class)."""
    return _meta_template(type(teacher), teacher.config)
