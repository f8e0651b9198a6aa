"""The native step backend: one decode step of a group's layers in one kernel call (`LayerStack.step`,
`services/cpu/kernels/decoder_step.cpp`), reading the modules' own tensors and appending to the batch's KV
buffers in place. For fp32, int8 or 4-bit CPU Llama-style layers (Llama/SmolLM2, Qwen2 with its biases, Qwen3 with
its q/k norms) when native kernels are on; every other group takes the torch backend (`torch_layers`)."""

from __future__ import annotations

import torch
from torch import nn

from services.cpu.fast_linear import FastLinear
from services.cpu.kernels.decoder_step import load_decoder_step
from services.family.int8 import Int8Linear
from services.family.q4 import Q4Linear

# Architectures whose decoder layer is Llama's (pre-norm, rotate-half RoPE, SiLU-gated MLP), with the same
# module names; Qwen2 adds q/k/v biases and Qwen3 per-head q/k RMSNorms, both handled by the kernel.
FUSED_MODEL_TYPES = frozenset({"llama", "qwen2", "qwen3"})
# fp32 tensors, int8 matrices, 4-bit matrices (uint8) with their fp16 block scales and minimums
KERNEL_DTYPES = frozenset({torch.float32, torch.int8, torch.uint8, torch.float16})


def _tensor(module: nn.Module | None, name: str) -> torch.Tensor:
    """The module's parameter or buffer, or an empty tensor (the kernel's "none")."""
    value = getattr(module, name, None) if module is not None else None
    return value.detach() if value is not None else torch.empty(0)


def layer_tensors(layer: nn.Module) -> list[torch.Tensor]:
    """A decoder layer's tensors in the kernel's slot order (`Layer` in decoder_step.cpp)."""
    attn, mlp = layer.self_attn, layer.mlp
    return [
        _tensor(layer.input_layernorm, "weight"),
        _tensor(attn.q_proj, "weight"),
        _tensor(attn.q_proj, "bias"),
        _tensor(attn.k_proj, "weight"),
        _tensor(attn.k_proj, "bias"),
        _tensor(attn.v_proj, "weight"),
        _tensor(attn.v_proj, "bias"),
        _tensor(attn.o_proj, "weight"),
        _tensor(attn.o_proj, "bias"),
        _tensor(getattr(attn, "q_norm", None), "weight"),
        _tensor(getattr(attn, "k_norm", None), "weight"),
        _tensor(layer.post_attention_layernorm, "weight"),
        _tensor(mlp.gate_proj, "weight"),
        _tensor(mlp.up_proj, "weight"),
        _tensor(mlp.down_proj, "weight"),
        *(_tensor(matrix, "weight_scale") for matrix in _matrices(layer)),
        *(_tensor(matrix, "weight_min") for matrix in _matrices(layer)),
    ]


def _matrices(layer: nn.Module) -> list[nn.Module]:
    """The seven weight matrices in the kernel's order; int8 ones carry a per-row `weight_scale`, 4-bit ones
    per-block `weight_scale` and `weight_min`."""
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]


def _layer_supported(layer: nn.Module) -> bool:
    tensors = layer_tensors(layer)
    return all(t.dtype in KERNEL_DTYPES and t.device.type == "cpu" and t.is_contiguous() for t in tensors) and all(
        getattr(layer.mlp, name).bias is None for name in ("gate_proj", "up_proj", "down_proj")
    )


def _constants(layer: nn.Module) -> tuple[float, float, float]:
    """(RMSNorm eps, q/k norm eps, attention scaling) of one layer."""
    q_norm = getattr(layer.self_attn, "q_norm", None)
    return (
        layer.input_layernorm.variance_epsilon,
        q_norm.variance_epsilon if q_norm is not None else 0.0,
        layer.self_attn.scaling,
    )


def layer_stack(kernel, layers: list[nn.Module], config):
    """The kernel's `LayerStack` over these decoder layers (their own tensors), or None where it cannot run
    them all: a layer in another dtype or device, MLP biases, or layers that differ in norm eps or scaling."""
    constants = {_constants(layer) for layer in layers}
    if not layers or len(constants) != 1 or not all(_layer_supported(layer) for layer in layers):
        return None
    return kernel.LayerStack(
        [layer_tensors(layer) for layer in layers],
        config.num_attention_heads,
        config.num_key_value_heads,
        *constants.pop(),
    )


def _kernel_on(matrix: nn.Module) -> bool:
    """Native kernels are on for this matrix: swapped to `FastLinear` (fp32), or int8 or 4-bit with the kernel."""
    return type(matrix) is FastLinear or (type(matrix) in (Int8Linear, Q4Linear) and matrix.use_kernel)


def config_supported(config) -> bool:
    """Llama-style layers that attend every position (no sliding window, which the kernel does not mask)."""
    full_attention = all(kind == "full_attention" for kind in getattr(config, "layer_types", None) or [])
    no_window = getattr(config, "sliding_window", None) is None or not getattr(config, "use_sliding_window", True)
    return config.model_type in FUSED_MODEL_TYPES and config.hidden_act == "silu" and full_attention and no_window


class NativeStep:
    """A group's decode step, or a short prompt's positions, through the kernel's `LayerStack`."""

    def __init__(self, stack):
        self.stack = stack

    def step(
        self,
        hidden: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        length: int,
        mask: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        positions: torch.Tensor,
    ) -> torch.Tensor:
        """hidden [rows, hidden_size] after the group's layers; writes position `length` of each layer's
        keys and values [rows, kv_heads, capacity, head_dim]. mask [rows, length + 1] (1: attend); cos, sin
        [rows, head_dim] fp32; `positions` is unused (the rotary values carry it)."""
        return self.run(hidden, keys, values, length, mask, positions, (cos, sin))

    def run(
        self,
        hidden: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        start: int,
        filled: torch.Tensor,
        position_ids: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """hidden [rows, (new,) hidden_size] after the group's layers, for `new` prompt positions (or one) from
        `start` (filled [rows, start + new], 1 where a position holds a token; cos, sin [rows, (new,) head_dim]
        fp32); writes those positions of each layer's keys and values. `position_ids` is unused."""
        hidden = hidden.contiguous()  # updated in place by the kernel
        cos, sin = (part.contiguous() for part in position_embeddings)
        self.stack.step(hidden, keys, values, start, filled.to(torch.long).contiguous(), cos, sin)
        return hidden


def native_step(layers: list[nn.Module], config) -> NativeStep | None:
    """The native backend for these layers, or None where it does not apply (native kernels off or not
    built, another architecture, dtype or device, a sliding window)."""
    if not config_supported(config) or not all(_kernel_on(matrix) for layer in layers for matrix in _matrices(layer)):
        return None
    kernel = load_decoder_step()
    stack = layer_stack(kernel, layers, config) if kernel is not None else None
    return NativeStep(stack) if stack is not None else None
