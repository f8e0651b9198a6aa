"""4-bit weights: every linear layer of a pair in blocks of 32 with a scale and a minimum each (llama.cpp's Q4_1,
`services/family/q4_blocks.py`). Range-rounded as llama.cpp rounds them, so a teacher whose source is a Q4_1
GGUF comes back to the very blocks of its file and loses nothing; matrices with calibration statistics fitted
to them instead (`services/family/gptq.py`). Embeddings (and the head tied to them) take int8 rows
(`services/family/int8.py`), as llama.cpp keeps a model's embedding in 8 bits: the head's error reaches every
logit. As with int8, modules' classes are swapped in place, shared tensors are quantized once, decode rows on
CPU go to the native kernel (`gemv_q4`, which the decoder-step kernel shares) and everything else dequantizes on
the fly in chunks of output rows.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from services.cpu.fast_linear import MAX_ROWS
from services.cpu.kernels.gemv import load_gemv_q4
from services.family.gptq import InputStats, gptq_blocks
from services.family.int8 import CHUNK_ROWS, quantize_int8, users_by_tensor, warn_no_kernel
from services.family.q4_blocks import ROW_MULTIPLE, dequantize_blocks, quantize_blocks


class Q4Linear(nn.Linear):
    """`nn.Linear` over packed 4-bit `weight` [out, in / 2] (uint8) with fp16 buffers `weight_scale` and
    `weight_min` [out, in / 32]."""

    use_kernel = False  # set per module by `quantize_q4`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.use_kernel and rows <= MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu":
            out = load_gemv_q4()(
                x.reshape(rows, self.in_features), self.weight, self.weight_scale, self.weight_min, self.bias
            )  # [rows, out]
            return out.view(*x.shape[:-1], self.out_features)
        pieces = [
            functional.linear(
                x,
                dequantize_blocks(
                    self.weight[start : start + CHUNK_ROWS],
                    self.weight_scale[start : start + CHUNK_ROWS],
                    self.weight_min[start : start + CHUNK_ROWS],
                    x.dtype,
                ),
            )
            for start in range(0, self.out_features, CHUNK_ROWS)
        ]  # each [..., chunk]
        out = torch.cat(pieces, dim=-1)  # [..., out]
        return out + self.bias if self.bias is not None else out


def _in_blocks(modules: list[nn.Module]) -> bool:
    """Linear layers only (no embedding among the tensor's users), rows a whole number of blocks."""
    return all(isinstance(m, nn.Linear) for m in modules) and modules[0].in_features % ROW_MULTIPLE == 0


def quantize_q4(models: list[nn.Module], use_kernel: bool, inputs: dict[int, InputStats] | None = None,
                keep_int8: frozenset[int] = frozenset()) -> int:
    """Quantizes every linear layer of `models` in place to 4-bit blocks, and embeddings with the heads that
    share them (and any matrix whose rows are not whole blocks, or in `keep_int8`) to int8; each distinct tensor
    once. Returns how many tensors. `use_kernel`: decode rows on CPU go to the native kernels. Both keyed by
    weight `data_ptr`: `inputs`, a tensor's inputs on calibration text, its blocks fitted to them by
    `gptq_blocks` (the others range-rounded); `keep_int8`, tensors held in int8 rows."""
    groups = users_by_tensor(models)
    kernel = use_kernel and load_gemv_q4() is not None
    if use_kernel and not kernel:
        warn_no_kernel("q4")
    for pointer, modules in groups.items():
        if not _in_blocks(modules) or pointer in keep_int8:
            continue
        seen = (inputs or {}).get(pointer)
        weight = modules[0].weight
        packed, scale, minimum = quantize_blocks(weight) if seen is None else gptq_blocks(weight, seen)
        weight = nn.Parameter(packed, requires_grad=False)
        for module in modules:
            module.weight = weight
            module.register_buffer("weight_scale", scale, persistent=False)
            module.register_buffer("weight_min", minimum, persistent=False)
            module.__class__ = Q4Linear
            module.use_kernel = kernel
    quantize_int8(models, kernel, inputs)  # what is left: embeddings, tied heads, odd widths, `keep_int8`
    return len(groups)


def disable_q4_kernel(model: nn.Module) -> None:
    """4-bit layers of `model` off the native kernel (a baseline that must be plain torch)."""
    for module in model.modules():
        if isinstance(module, Q4Linear):
            module.use_kernel = False
