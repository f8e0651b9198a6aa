"""Decode steps of Llama-style variants in one native call for all layers (`services/cpu/kernels/decoder_step.cpp`).

A transformers forward spends more time in per-module Python than a small layer spends reading its weights.
Here a decode step is: embed in torch, rotary cos/sin looked up (`rotary_table`), then one kernel
call for all the layers (`LayerStack.step`) and one for norm + output layer. The model is untouched: its
modules' tensors are read in place, and the KV cache is the batch's own `SlotCache` (its `GrowingLayer`
buffers), so prefill, scoring and every other path keep using the transformers forward. Used for fp32 CPU
batches of up to `MAX_ROWS` rows when native kernels are on (the variant's layers are `FastLinear`), else
the caller falls back.
"""

from __future__ import annotations

import torch
from torch import nn

from services.cpu.fast_linear import MAX_ROWS, FastLinear
from services.cpu.kernels.decoder_step import load_decoder_step
from services.cpu.rotary_table import rotary_lookup, table_allowed
from services.family.architectures import get_path, spec_for
from services.family.kv_buffer import GrowingLayer

# Architectures whose decoder layer is Llama's (pre-norm, rotate-half RoPE, SiLU-gated MLP), with the same
# module names; Qwen2 adds q/k/v biases and Qwen3 per-head q/k RMSNorms, both handled by the kernel.
FUSED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3"})


def _tensor(module: nn.Module | None, name: str) -> torch.Tensor:
    """The module's parameter, or an empty tensor (the kernel's "none")."""
    value = getattr(module, name, None) if module is not None else None
    return value.detach() if value is not None else torch.empty(0)


def layer_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """A decoder layer's tensors in the kernel's slot order (`Layer` in decoder_step.cpp)."""
    attn, mlp = layer.self_attn, layer.mlp
    return [_tensor(layer.input_layernorm, "weight"),
            _tensor(attn.q_proj, "weight"), _tensor(attn.q_proj, "bias"),
            _tensor(attn.k_proj, "weight"), _tensor(attn.k_proj, "bias"),
            _tensor(attn.v_proj, "weight"), _tensor(attn.v_proj, "bias"),
            _tensor(attn.o_proj, "weight"), _tensor(attn.o_proj, "bias"),
            _tensor(getattr(attn, "q_norm", None), "weight"), _tensor(getattr(attn, "k_norm", None), "weight"),
            _tensor(layer.post_attention_layernorm, "weight"),
            _tensor(mlp.gate_proj, "weight"), _tensor(mlp.up_proj, "weight"), _tensor(mlp.down_proj, "weight")]


def _layer_supported(layer: nn.Module) -> bool:
    tensors = layer_tensors(layer)
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors) and all(
        getattr(layer.mlp, name).bias is None for name in ("gate_proj", "up_proj", "down_proj"))


def _constants(layer: nn.Module) -> tuple[float, float, float]:
    """(RMSNorm eps, q/k norm eps, attention scaling) of one layer."""
    q_norm = getattr(layer.self_attn, "q_norm", None)
    return (layer.input_layernorm.variance_epsilon, q_norm.variance_epsilon if q_norm is not None else 0.0,
            layer.self_attn.scaling)


def layer_stack(kernel, layers: list[nn.Module], config):
    """The kernel's `LayerStack` over these decoder layers (their own tensors), or None where it cannot run
    them all: a layer in another dtype or device, MLP biases, or layers that differ in norm eps or scaling."""
    constants = {_constants(layer) for layer in layers}
    if not layers or len(constants) != 1 or not all(_layer_supported(layer) for layer in layers):
        return None
    return kernel.LayerStack([layer_tensors(layer) for layer in layers], config.num_attention_heads,
                             config.num_key_value_heads, *constants.pop())


def _config_supported(config) -> bool:
    full_attention = all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or [])
    no_window = getattr(config, "sliding_window", None) is None or not getattr(config, "use_sliding_window", True)
    return config.model_type in FUSED_MODEL_TYPES and config.hidden_act == "silu" and full_attention and no_window


class DecoderStep:
    """The decode step of one variant; build with `decoder_step(model)`."""

    def __init__(self, model: nn.Module, stack, kernel):
        spec = spec_for(model.config.model_type)
        self.kernel, self.stack = kernel, stack
        rotary = get_path(model, spec.rotary)
        self.embed, self.rotary = get_path(model, spec.embed), rotary_lookup(rotary)
        # several steps per call need cos/sin of positions ahead: only where those do not depend on the past
        self.takes_steps_ahead = table_allowed(rotary) and type(self.embed) is nn.Embedding
        norm = get_path(model, spec.norm)
        self.norm_weight, self.norm_eps = norm.weight.detach(), norm.variance_epsilon
        self.head_weight = get_path(model, spec.head).weight.detach()

    def accepts(self, batch_size: int, cache) -> bool:
        """Whether this batch can take native steps (few rows; a prefilled in-place KV cache)."""
        return batch_size <= MAX_ROWS and len(cache.layers) == len(self.stack) and all(
            type(layer) is GrowingLayer and layer.filled() for layer in cache.layers)

    @torch.inference_mode()
    def step(self, input_ids: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor,
             cache) -> torch.Tensor:
        """Logits [batch, vocab] of one decode step; appends this step's keys and values to `cache`."""
        hidden = self.embed(input_ids[:, 0]).contiguous()  # [batch, hidden_size], updated in place below
        cos, sin = self.rotary(positions[:, 0])  # [batch, head_dim] each
        mask = attention_mask.to(torch.long).contiguous()  # [batch, seen]
        keys, values, length = _reserve(cache, 1)
        self.stack.step(hidden, keys, values, length, mask, cos, sin)
        _advance(cache, length + 1)
        return self.kernel.norm_and_head(hidden, self.norm_weight, self.norm_eps, self.head_weight)  # [batch, vocab]

    @torch.inference_mode()
    def greedy_steps(self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor, cache,
                     steps: int, stop_ids: list[int], alive: list[bool]) -> torch.Tensor:
        """Up to `steps` greedy steps in one native call, from `tokens` [batch] at `positions` [batch, 1]
        (mask [batch, seen] as for `step`); returns the chosen tokens [n, batch] and appends n positions to
        `cache`. It ends early once every live row has chosen one of `stop_ids`."""
        keys, values, length = _reserve(cache, steps)
        ahead = positions[:, 0] + torch.arange(steps)[:, None]  # [steps, batch]
        cos, sin = self.rotary(ahead.reshape(-1))  # [steps * batch, head_dim] each
        cos, sin = cos.view(steps, len(tokens), -1), sin.view(steps, len(tokens), -1)  # [steps, batch, head_dim]
        mask = attention_mask.to(torch.long).contiguous()  # [batch, seen]
        chosen = self.stack.greedy(tokens.to(torch.long), keys, values, length, mask, cos, sin,
                                   self.embed.weight.detach(), self.norm_weight, self.norm_eps, self.head_weight,
                                   steps, stop_ids, alive)  # [n, batch]
        _advance(cache, length + len(chosen))
        return chosen


def _reserve(cache, new: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Every layer's KV buffers [batch, kv_heads, capacity, head_dim] with room for `new` more positions,
    and the filled length they share."""
    keys, values, lengths = zip(*(cache_layer.reserve(new) for cache_layer in cache.layers))
    assert len(set(lengths)) == 1, "layers of one batch hold the same positions"
    return list(keys), list(values), lengths[0]


def _advance(cache, length: int) -> None:
    """Positions [0, length) of every layer's buffers are now filled."""
    for cache_layer in cache.layers:
        cache_layer.advance(length)


def decoder_step(model: nn.Module) -> DecoderStep | None:
    """The variant's native decoder step (built once, kept on the model), or None where it does not apply."""
    cached = model.__dict__.get("_boomerang_decoder_step", False)
    if cached is not False:
        return cached
    decoder = _build(model)
    model.__dict__["_boomerang_decoder_step"] = decoder
    return decoder


def _build(model: nn.Module) -> DecoderStep | None:
    config = model.config
    if not _config_supported(config):
        return None
    spec = spec_for(config.model_type)
    head = get_path(model, spec.head)
    if type(head) is not FastLinear or head.bias is not None:  # native kernels off for this model, or a biased head
        return None
    kernel = load_decoder_step()
    stack = layer_stack(kernel, list(get_path(model, spec.layers)), config) if kernel is not None else None
    return DecoderStep(model, stack, kernel) if stack is not None else None
