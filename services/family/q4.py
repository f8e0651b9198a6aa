"""4-bit weights: every linear layer of a pair in blocks of 32 with a scale and a minimum each (llama.cpp's Q4_1).

`weight ~ q * scale + minimum` per block, q in 0..15, scale and minimum fp16: 5 bits a weight. Blocks are
packed in pairs (the kernel unpacks two blocks with one load; `services/cpu/kernels/dot.h`). Quantized exactly as
llama.cpp quantizes, so a teacher whose source is a Q4_1 GGUF comes back to the very blocks of its file and
loses nothing. Embeddings (and the head tied to them) take int8 rows (`services/family/int8.py`), as llama.cpp
keeps a model's embedding in 8 bits: the head's error reaches every logit. As with int8, modules' classes are
swapped in place, shared tensors are quantized once, decode rows on CPU go to the native kernel (`gemv_q4`, which
the decoder-step kernel shares) and everything else dequantizes on the fly in chunks of output rows.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from services.cpu.fast_linear import MAX_ROWS
from services.cpu.kernels.gemv import load_gemv_q4
from services.family.int8 import CHUNK_ROWS, quantize_int8, users_by_tensor, warn_no_kernel

BLOCK = 32  # weights per block: one scale and one minimum each
ROW_MULTIPLE = 2 * BLOCK  # blocks are packed in pairs
Q4_MAX = 15  # 4 bits: q in 0..Q4_MAX


FIT_STEPS = 11  # candidate scales around the range's, each refined by weighted least squares


def quantize_blocks(
    weight: torch.Tensor, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [rows, n / 2], scale fp16 [rows, n / 32], minimum fp16 [rows, n / 32]) for weight
    [rows, n], n a multiple of 64, packed in pairs (byte j: element j of a pair's first block in the low nibble,
    of its second in the high one). Without `importance` blocks are rounded as llama.cpp's reference Q4_1
    quantizer rounds them; with it (`[n]`, how large each input runs) as `fit_blocks` fits them."""
    rows, n = weight.shape
    blocks = weight.detach().float().reshape(rows, n // BLOCK, BLOCK)  # [rows, nb, 32]
    if importance is None:
        low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)  # [rows, nb]
        scale = (high - low) / Q4_MAX  # [rows, nb]
    else:
        scale, low = fit_blocks(blocks, importance.float().reshape(n // BLOCK, BLOCK))  # [rows, nb] each
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.floor((blocks - low[..., None]) * inverse[..., None] + 0.5).clamp(0, Q4_MAX).to(torch.uint8)
    pairs = q.reshape(rows, n // (2 * BLOCK), 2, BLOCK)  # [rows, nb / 2, 2, 32]
    packed = pairs[:, :, 0] | (pairs[:, :, 1] << 4)  # [rows, nb / 2, 32]
    return packed.reshape(rows, n // 2), scale.half(), low.half()


def fit_blocks(blocks: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and minimum [rows, nb] (values fp16 can hold) of each block of `blocks` [rows, nb, 32] with the
    least error weighted by `importance` [nb, 32]: the block's range (exact for a block that came from 4 bits)
    unless a least-squares fit over the levels of a nearby scale does better, as llama.cpp fits blocks to an
    importance matrix."""
    weight = importance.expand_as(blocks)  # [rows, nb, 32]
    low, high = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)  # [rows, nb, 1]
    span = (high - low).clamp_min(torch.finfo(torch.float32).tiny)  # [rows, nb, 1]
    best = _weighted_error(blocks, weight, span / Q4_MAX, low)
    total = weight.sum(dim=-1, keepdim=True)  # [rows, nb, 1]
    for step in torch.linspace(-1, 1, FIT_STEPS).tolist():
        levels = ((blocks - low) * ((Q4_MAX + step) / span)).round().clamp(0, Q4_MAX)  # [rows, nb, 32]
        sum_l, sum_ll = (weight * levels).sum(-1, keepdim=True), (weight * levels * levels).sum(-1, keepdim=True)
        sum_x, sum_lx = (weight * blocks).sum(-1, keepdim=True), (weight * levels * blocks).sum(-1, keepdim=True)
        determinant = total * sum_ll - sum_l * sum_l  # [rows, nb, 1]
        solvable = determinant > 0
        determinant = torch.where(solvable, determinant, torch.ones_like(determinant))
        scale = torch.where(solvable, (total * sum_lx - sum_l * sum_x) / determinant, span / Q4_MAX)
        minimum = torch.where(solvable, (sum_ll * sum_x - sum_l * sum_lx) / determinant, low)
        candidate = _weighted_error(blocks, weight, scale, minimum)
        better = candidate[0] < best[0]  # [rows, nb, 1]
        best = tuple(torch.where(better, new, old) for new, old in zip(candidate, best))
    return best[1].squeeze(-1), best[2].squeeze(-1)


def _weighted_error(blocks: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor):
    """(error, scale, minimum) [rows, nb, 1] each, with scale and minimum rounded to fp16 as they are stored."""
    scale, minimum = scale.half().float(), minimum.half().float()
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    levels = torch.floor((blocks - minimum) * inverse + 0.5).clamp(0, Q4_MAX)  # [rows, nb, 32]
    error = (weight * (levels * scale + minimum - blocks) ** 2).sum(dim=-1, keepdim=True)
    return error, scale, minimum


def dequantize_blocks(
    packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """weight [rows, n] in `dtype` (computed in fp32) from `quantize_blocks`' three tensors."""
    rows, blocks = scale.shape
    pairs = packed.reshape(rows, blocks // 2, BLOCK)  # [rows, nb / 2, 32]
    q = torch.stack([pairs & 0x0F, pairs >> 4], dim=2).reshape(rows, blocks, BLOCK).float()  # [rows, nb, 32]
    weight = q * scale.float()[..., None] + minimum.float()[..., None]  # [rows, nb, 32]
    return weight.reshape(rows, blocks * BLOCK).to(dtype)


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


def quantize_q4(models: list[nn.Module], use_kernel: bool, importance: dict[int, torch.Tensor] | None = None,
                keep_int8: frozenset[int] = frozenset()) -> int:
    """Quantizes every linear layer of `models` in place to 4-bit blocks, and embeddings with the heads that
    share them (and any matrix whose rows are not whole blocks, or in `keep_int8`) to int8; each distinct tensor
    once. Returns how many tensors. `use_kernel`: decode rows on CPU go to the native kernels. Both keyed by
    weight `data_ptr`: `importance`, how large each input of a tensor runs [in_features], its blocks fitted to
    it; `keep_int8`, tensors held in int8 rows."""
    groups = users_by_tensor(models)
    kernel = use_kernel and load_gemv_q4() is not None
    if use_kernel and not kernel:
        warn_no_kernel("q4")
    for pointer, modules in groups.items():
        if not _in_blocks(modules) or pointer in keep_int8:
            continue
        packed, scale, minimum = quantize_blocks(modules[0].weight, (importance or {}).get(pointer))
        weight = nn.Parameter(packed, requires_grad=False)
        for module in modules:
            module.weight = weight
            module.register_buffer("weight_scale", scale, persistent=False)
            module.register_buffer("weight_min", minimum, persistent=False)
            module.__class__ = Q4Linear
            module.use_kernel = kernel
    quantize_int8(models, kernel)  # what is left: embeddings, tied heads, odd widths
    return len(groups)


def disable_q4_kernel(model: nn.Module) -> None:
    """4-bit layers of `model` off the native kernel (a baseline that must be plain torch)."""
    for module in model.modules():
        if isinstance(module, Q4Linear):
            module.use_kernel = False
