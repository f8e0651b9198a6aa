"""Per-architecture facts: where a causal LM keeps its layers, embeddings, norm, head and rotary embedding."""

from __future__ import annotations

from dataclasses import dataclass

from services.errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureSpec:
    """Attribute paths inside a `*ForCausalLM` module, relative to the top module."""

    base: str
    layers: str
    embed: str
    norm: str
    rotary: str
    head: str
    attention: str


_LLAMA_LIKE = ArchitectureSpec(
    base="model", layers="model.layers", embed="model.embed_tokens", norm="model.norm",
    rotary="model.rotary_emb", head="lm_head", attention="self_attn")

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "gpt_neox": ArchitectureSpec(
        base="gpt_neox", layers="gpt_neox.layers", embed="gpt_neox.embed_in",
        norm="gpt_neox.final_layer_norm", rotary="gpt_neox.rotary_emb", head="lm_head",
        attention="attention"),
}

# Config fields that hold one entry per decoder layer and must follow the layers they describe.
PER_LAYER_CONFIG_FIELDS = ("layer_types",)


def spec_for(model_type: str) -> ArchitectureSpec:
    """The table entry for a config's `model_type`, or a clear error naming what is supported."""
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def kv_shape(config) -> tuple[int, int]:
    """(key/value heads, head dim) of a config's attention. GPT-NeoX has a key/value head per query head and
    head_dim = hidden_size / heads, whatever other fields its config holds."""
    heads = config.num_attention_heads
    if getattr(config, "model_type", None) == "gpt_neox":
        return heads, config.hidden_size // heads
    return (getattr(config, "num_key_value_heads", None) or heads,
            getattr(config, "head_dim", None) or config.hidden_size // heads)


def get_path(module, path: str):
    """Follow a dotted attribute path."""
    for name in path.split("."):
        module = getattr(module, name)
    return module


def number_layers(model, layers_path: str, first: int = 0) -> None:
    """Set `layer_idx` (the KV-cache slot) on every submodule of each decoder layer: first, first+1, …"""
    for index, layer in enumerate(get_path(model, layers_path)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = first + index


def set_path(module, path: str, value) -> None:
    """Set the attribute at the end of a dotted path."""
    parent, _, name = path.rpartition(".")
    setattr(get_path(module, parent) if parent else module, name, value)
