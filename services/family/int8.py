"""int8 weights: every linear layer and embedding of a pair stored as int8 with one fp32 scale per output row.

Weight-only and symmetric: `weight ~ q * scale`, q in [-127, 127], scale = max |row| / 127; activations and
accumulation stay in the float dtype. As with `FastLinear`, the modules' classes are swapped in place and the
model's code is untouched. Decode rows on CPU go to the int8 GEMV kernel (`gemv_q8`, and the decoder-step
kernel reads the same tensors); everything else dequantizes on the fly, in chunks of output rows, so a prefill
never holds a whole fp32 copy of a large matrix. Tensors shared between the models (a tied or shared
embedding) are quantized once and stay shared.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn import functional

from services.cpu.fast_linear import MAX_ROWS, FastLinear
from services.cpu.kernels.gemv import load_gemv_q8
from services.family.gptq import InputStats, gptq_rows
from services.family.int8_rows import dequantize_rows, quantize_rows

logger = logging.getLogger(__name__)

CHUNK_ROWS = 4096  # output rows dequantized at a time off the kernel path


def warn_no_kernel(form: str) -> None:
    logger.warning("%s weights without their native kernel (not x86 with AVX2/FMA, or no C++ compiler): every "
                   "decode step dequantizes each matrix in torch, several times slower than --weights float; "
                   "serve --weights float on this machine", form)


class Int8Linear(nn.Linear):
    """`nn.Linear` over int8 `weight` [out, in] and fp32 `weight_scale` [out] (a buffer: the model's float
    parameters still say its dtype)."""

    use_kernel = False  # set per module by `quantize_int8`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.use_kernel and rows <= MAX_ROWS and x.dtype == torch.float32 and x.device.type == "cpu":
            out = load_gemv_q8()(x.reshape(rows, self.in_features), self.weight, self.weight_scale, self.bias)
            return out.view(*x.shape[:-1], self.out_features)  # [..., out]
        pieces = [
            functional.linear(
                x,
                dequantize_rows(
                    self.weight[start : start + CHUNK_ROWS], self.weight_scale[start : start + CHUNK_ROWS], x.dtype
                ),
            )
            for start in range(0, self.out_features, CHUNK_ROWS)
        ]  # each [..., chunk]
        out = torch.cat(pieces, dim=-1)  # [..., out]
        return out + self.bias if self.bias is not None else out


class Int8Embedding(nn.Embedding):
    """`nn.Embedding` over int8 `weight` [vocab, hidden] and fp32 `weight_scale` [vocab]: rows dequantized
    as they are looked up, in `output_dtype`."""

    output_dtype = torch.float32

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = functional.embedding(input_ids, self.weight).to(self.output_dtype)  # [..., hidden]
        return rows * self.weight_scale[input_ids].to(self.output_dtype)[..., None]


def float_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module computes in: its first float parameter's (int8 weights are not float)."""
    return next(p.dtype for p in module.parameters() if p.is_floating_point())


def is_int8(module: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in module.modules())


def users_by_tensor(models: list[nn.Module]) -> dict[int, list[nn.Module]]:
    """Linear layers and embeddings grouped by the weight tensor they hold (shared and tied ones together);
    each embedding learns the dtype it must return."""
    users: dict[int, list[nn.Module]] = {}
    for model in models:
        dtype = float_dtype(model)
        for module in model.modules():
            if type(module) in (nn.Linear, FastLinear, nn.Embedding):
                if isinstance(module, nn.Embedding):
                    module.output_dtype = dtype
                users.setdefault(module.weight.data_ptr(), []).append(module)
    return users


def quantize_int8(models: list[nn.Module], use_kernel: bool, inputs: dict[int, InputStats] | None = None) -> int:
    """Quantizes every linear layer and embedding of `models` in place (each distinct weight tensor once);
    returns how many tensors. `use_kernel`: decode rows on CPU go to the native int8 GEMV. `inputs`, keyed
    by weight `data_ptr`: a linear layer's inputs on calibration text, its rows rounded by `gptq_rows` to fit
    them (the others to nearest)."""
    users = users_by_tensor(models)
    kernel = use_kernel and load_gemv_q8() is not None
    if use_kernel and not kernel:
        warn_no_kernel("int8")
    for pointer, modules in users.items():
        seen = (inputs or {}).get(pointer)
        weight = modules[0].weight
        q, scale = quantize_rows(weight) if seen is None else gptq_rows(weight, seen)
        weight = nn.Parameter(q, requires_grad=False)
        for module in modules:
            module.weight = weight
            module.register_buffer("weight_scale", scale, persistent=False)
            module.__class__ = Int8Embedding if isinstance(module, nn.Embedding) else Int8Linear
            if isinstance(module, Int8Linear):
                module.use_kernel = kernel
    return len(users)


def disable_int8_kernel(model: nn.Module) -> None:
    """int8 layers of `model` off the native kernel (a baseline that must be plain torch)."""
    for module in model.modules():
        if isinstance(module, Int8Linear):
            module.use_kernel = False
