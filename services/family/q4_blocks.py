"""Llama.cpp's Q4_1 block format: weights in blocks of 32 along a row, `weight ~ q * scale + minimum` per block,
q in 0..15, scale and minimum fp16 (5 bits a weight), blocks packed in pairs for the kernel. Rounding,
fitting, packing and unpacking; the modules that serve it are in `services/family/q4.py`."""

from __future__ import annotations

import torch

BLOCK = 32  # weights per block: one scale and one minimum each
ROW_MULTIPLE = 2 * BLOCK  # blocks are packed in pairs
Q4_MAX = 15  # 4 bits: q in 0..Q4_MAX
FIT_STEPS = 11  # candidate scales around the range's, each refined by weighted least squares


def quantize_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [rows, n / 2], scale fp16 [rows, n / 32], minimum fp16 [rows, n / 32]) for weight
    [rows, n], n a multiple of 64, packed in pairs (byte j: element j of a pair's first block in the low nibble,
    of its second in the high one), each block rounded to its range as llama.cpp's reference Q4_1 quantizer
    rounds it (`services/family/gptq.py` fits them to calibration activations instead)."""
    rows, n = weight.shape
    blocks = weight.detach().float().reshape(rows, n // BLOCK, BLOCK)  # [rows, nb, 32]
    low, high = blocks.amin(dim=-1), blocks.amax(dim=-1)  # [rows, nb]
    scale = (high - low) / Q4_MAX  # [rows, nb]
    inverse = inverse_scale(scale)
    q = torch.floor((blocks - low[..., None]) * inverse[..., None] + 0.5).clamp(0, Q4_MAX).to(torch.uint8)
    return pack_levels(q.reshape(rows, n)), scale.half(), low.half()


def inverse_scale(scale: torch.Tensor) -> torch.Tensor:
    """1 / scale, and 0 for a block of equal weights (scale 0: every weight its minimum)."""
    return torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))


def pack_levels(levels: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, n / 2] from levels uint8 [rows, n] (0..15), blocks packed in pairs as the kernel reads them."""
    rows, n = levels.shape
    pairs = levels.reshape(rows, n // (2 * BLOCK), 2, BLOCK)  # [rows, nb / 2, 2, 32]
    packed = pairs[:, :, 0] | (pairs[:, :, 1] << 4)  # [rows, nb / 2, 32]
    return packed.reshape(rows, n // 2)


def fit_steps() -> torch.Tensor:
    """[FIT_STEPS] the candidate scales' offsets from the range's, in levels: span / (Q4_MAX + step)."""
    return torch.linspace(-1, 1, FIT_STEPS)


def fit_blocks(blocks: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and minimum [rows, nb] (values fp16 can hold) of each block of `blocks` [rows, nb, 32] with the
    least error weighted by `importance` [nb, 32]: the block's range (exact for a block that came from 4 bits)
    unless a least-squares fit over the levels of a nearby scale does better, as llama.cpp fits blocks to an
    importance matrix (`gptq_blocks` fits each block as it reaches it)."""
    weight = importance.expand_as(blocks)  # [rows, nb, 32]
    low, high = blocks.amin(dim=-1, keepdim=True), blocks.amax(dim=-1, keepdim=True)  # [rows, nb, 1]
    span = (high - low).clamp_min(torch.finfo(torch.float32).tiny)  # [rows, nb, 1]
    steps = fit_steps().view(-1, 1, 1, 1)  # [steps, 1, 1, 1]: all candidates at once
    levels = ((blocks - low) * ((Q4_MAX + steps) / span)).round().clamp(0, Q4_MAX)  # [steps, rows, nb, 32]
    total = weight.sum(dim=-1, keepdim=True)  # [rows, nb, 1]
    sum_l, sum_ll = (weight * levels).sum(-1, keepdim=True), (weight * levels * levels).sum(-1, keepdim=True)
    sum_x, sum_lx = (weight * blocks).sum(-1, keepdim=True), (weight * levels * blocks).sum(-1, keepdim=True)
    determinant = total * sum_ll - sum_l * sum_l  # [steps, rows, nb, 1]
    solvable = determinant > 0
    determinant = torch.where(solvable, determinant, torch.ones_like(determinant))
    scale = torch.where(solvable, (total * sum_lx - sum_l * sum_x) / determinant, span / Q4_MAX)
    minimum = torch.where(solvable, (sum_ll * sum_x - sum_l * sum_lx) / determinant, low)
    scale, minimum = torch.cat([(span / Q4_MAX)[None], scale]), torch.cat([low[None], minimum])  # the range first
    error, scale, minimum = _weighted_error(blocks, weight, scale, minimum)  # [1 + steps, rows, nb, 1] each
    best = error.argmin(dim=0, keepdim=True)  # [1, rows, nb, 1]: the first of equals, so the range on a tie
    return scale.gather(0, best)[0, ..., 0], minimum.gather(0, best)[0, ..., 0]


def _weighted_error(blocks: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor):
    """(error, scale, minimum) [..., rows, nb, 1] each, for blocks [rows, nb, 32] and candidates [..., rows, nb,
    1], with scale and minimum rounded to fp16 as they are stored."""
    scale, minimum = scale.half().float(), minimum.half().float()
    inverse = inverse_scale(scale)
    levels = torch.floor((blocks - minimum) * inverse + 0.5).clamp(0, Q4_MAX)  # [..., rows, nb, 32]
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
