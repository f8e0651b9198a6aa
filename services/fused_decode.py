"""Decode steps of Llama-style variants with one native call per layer (`services/kernels/decoder_step.cpp`).

A transformers forward spends more time in per-module Python than a small layer spends reading its weights.
Here a decode step is: embed in torch, rotary cos/sin from the model's own rotary module, then one kernel
call per layer and one for norm + output layer. The model is untouched: its modules' tensors are read in
place, and the KV cache is the batch's own `SlotCache` (its `GrowingLayer` buffers), so prefill, scoring
and every other path keep using the transformers forward. Used for fp32 CPU batches of up to `MAX_ROWS`
rows when native kernels are on (the variant's layers are `FastLinear`), else the caller falls back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from services.architectures import get_path, spec_for
from services.fast_linear import MAX_ROWS, FastLinear
from services.kernels.decoder_step import load_decoder_step
from services.kv_buffer import GrowingLayer

# Architectures whose decoder layer is Llama's (pre-norm, rotate-half RoPE, SiLU-gated MLP), with the same
# module names; Qwen2 adds q/k/v biases and Qwen3 per-head q/k RMSNorms, both handled by the kernel.
FUSED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3"})


def _tensor(module: nn.Module | None, name: str) -> torch.Tensor:
    """The module's parameter, or an empty tensor (the kernel's "none")."""
    value = getattr(module, name, None) if module is not None else None
    return value.detach() if value is not None else torch.empty(0)


def layer_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """A decoder layer's tensors in the kernel's slot order (see `decoder_layer_step`)."""
    attn, mlp = layer.self_attn, layer.mlp
    return [_tensor(layer.input_layernorm, "weight"),
            _tensor(attn.q_proj, "weight"), _tensor(attn.q_proj, "bias"),
            _tensor(attn.k_proj, "weight"), _tensor(attn.k_proj, "bias"),
            _tensor(attn.v_proj, "weight"), _tensor(attn.v_proj, "bias"),
            _tensor(attn.o_proj, "weight"), _tensor(attn.o_proj, "bias"),
            _tensor(getattr(attn, "q_norm", None), "weight"), _tensor(getattr(attn, "k_norm", None), "weight"),
            _tensor(layer.post_attention_layernorm, "weight"),
            _tensor(mlp.gate_proj, "weight"), _tensor(mlp.up_proj, "weight"), _tensor(mlp.down_proj, "weight")]


@dataclass(frozen=True)
class FusedLayer:
    tensors: list[torch.Tensor]
    norm_eps: float
    qk_norm_eps: float
    scaling: float

    def run(self, kernel, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int,
            mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int) -> None:
        """One decode step of this layer: `hidden` [rows, hidden_size] in place, KV written at `length`."""
        kernel.decoder_layer_step(hidden, self.tensors, keys, values, length, mask, cos, sin, heads, kv_heads,
                                  self.norm_eps, self.qk_norm_eps, self.scaling)


def fused_layer(layer: nn.Module) -> FusedLayer | None:
    """The kernel's view of one decoder layer, or None where the kernel cannot run it."""
    tensors = layer_tensors(layer)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors):
        return None
    if any(getattr(layer.mlp, name).bias is not None for name in ("gate_proj", "up_proj", "down_proj")):
        return None
    q_norm = getattr(layer.self_attn, "q_norm", None)
    return FusedLayer(tensors, layer.input_layernorm.variance_epsilon,
                      q_norm.variance_epsilon if q_norm is not None else 0.0, layer.self_attn.scaling)


def _config_supported(config) -> bool:
    full_attention = all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or [])
    no_window = getattr(config, "sliding_window", None) is None or not getattr(config, "use_sliding_window", True)
    return config.model_type in FUSED_MODEL_TYPES and config.hidden_act == "silu" and full_attention and no_window


class FusedDecoder:
    """The decode step of one variant; build with `fused_decoder(model)`."""

    def __init__(self, model: nn.Module, layers: list[FusedLayer], kernel):
        spec = spec_for(model.config.model_type)
        self.kernel, self.layers = kernel, layers
        self.embed, self.rotary = get_path(model, spec.embed), get_path(model, spec.rotary)
        norm = get_path(model, spec.norm)
        self.norm_weight, self.norm_eps = norm.weight.detach(), norm.variance_epsilon
        self.head_weight = get_path(model, spec.head).weight.detach()
        self.heads, self.kv_heads = model.config.num_attention_heads, model.config.num_key_value_heads

    def accepts(self, batch_size: int, cache) -> bool:
        """Whether this batch can take fused steps (few rows; a prefilled in-place KV cache)."""
        return batch_size <= MAX_ROWS and len(cache.layers) == len(self.layers) and all(
            type(layer) is GrowingLayer and layer.is_initialized and layer.keys.numel() for layer in cache.layers)

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor,
             cache) -> torch.Tensor:
        """Logits [batch, vocab] of one decode step; appends this step's keys and values to `cache`."""
        hidden = self.embed(input_ids[:, 0]).contiguous()  # [batch, hidden_size], updated in place below
        cos, sin = self.rotary(hidden[:, None], positions)  # [batch, 1, head_dim] each
        cos, sin = cos[:, 0].float().contiguous(), sin[:, 0].float().contiguous()  # [batch, head_dim]
        mask = attention_mask.to(torch.long).contiguous()  # [batch, seen]
        for layer, cache_layer in zip(self.layers, cache.layers):
            keys, values, length = cache_layer.reserve(1)  # [batch, kv_heads, capacity, head_dim]
            layer.run(self.kernel, hidden, keys, values, length, mask, cos, sin, self.heads, self.kv_heads)
            cache_layer.advance(length + 1)
        return self.kernel.norm_and_head(hidden, self.norm_weight, self.norm_eps, self.head_weight)  # [batch, vocab]


def fused_decoder(model: nn.Module) -> FusedDecoder | None:
    """The variant's fused decoder (built once, kept on the model), or None where it does not apply."""
    cached = model.__dict__.get("_boomerang_fused_decoder", False)
    if cached is not False:
        return cached
    decoder = _build(model)
    model.__dict__["_boomerang_fused_decoder"] = decoder
    return decoder


def _build(model: nn.Module) -> FusedDecoder | None:
    config = model.config
    if not _config_supported(config):
        return None
    spec = spec_for(config.model_type)
    head = get_path(model, spec.head)
    if type(head) is not FastLinear or head.bias is not None:  # native kernels off for this model, or a biased head
        return None
    kernel = load_decoder_step()
    layers = [fused_layer(layer) for layer in get_path(model, spec.layers)]
    if kernel is None or any(layer is None for layer in layers):
        return None
    return FusedDecoder(model, layers, kernel)
