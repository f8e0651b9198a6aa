"""4-bit blocks fitted with error feedback (GPTQ, Frantar et al. 2022): a matrix's input columns are rounded one
at a time, and each column's rounding error is pushed onto the columns not yet rounded, weighted by how the
inputs co-vary on calibration text (`hessian`, the mean of x xᵀ), so the layer's outputs, not its weights, stay
close. Each block of 32 takes its scale and minimum when its first column is reached, from the weights as the
earlier errors left them. The result is the packed form `services/family/q4.py` serves."""

from __future__ import annotations

import torch

from services.family.q4_blocks import BLOCK, Q4_MAX, fit_blocks, pack_levels

DAMPING = 0.01  # of the mean diagonal, added to it: keeps the inverse defined where inputs never vary
COLUMNS_PER_UPDATE = 128  # columns whose errors are pushed onto the rest in one matrix product


def inverse_factor(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor [n, n] of the damped `hessian`'s inverse: row i holds how column i's error is
    spread over the columns after it."""
    n = hessian.shape[0]
    damped = hessian.double() + DAMPING * hessian.diagonal().mean().double() * torch.eye(n, dtype=torch.float64)
    dead = hessian.diagonal() == 0  # inputs that are always zero carry no error either way
    damped[dead, dead] = 1
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))  # [n, n]
    return torch.linalg.cholesky(inverse, upper=True).float()  # [n, n]


def gptq_blocks(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [rows, n / 2], scale fp16 [rows, n / 32], minimum fp16 [rows, n / 32]) as
    `services.family.q4_blocks.quantize_blocks` returns them, for weight [rows, n] and `hessian` [n, n]."""
    rows, n = weight.shape
    w = weight.detach().float().clone()  # [rows, n], errors pushed forward as columns are rounded
    factor = inverse_factor(hessian)  # [n, n]
    importance = hessian.diagonal().float()  # [n]
    levels = torch.empty(rows, n, dtype=torch.uint8)
    scale = torch.empty(rows, n // BLOCK)
    minimum = torch.empty(rows, n // BLOCK)
    for start in range(0, n, COLUMNS_PER_UPDATE):
        end = min(start + COLUMNS_PER_UPDATE, n)
        errors = torch.empty(rows, end - start)  # [rows, columns], each scaled by its pivot
        for column in range(start, end):
            if column % BLOCK == 0:
                group = column // BLOCK
                s, m = fit_blocks(w[:, None, column : column + BLOCK], importance[None, column : column + BLOCK])
                scale[:, group], minimum[:, group] = s[:, 0], m[:, 0]
            s, m = scale[:, column // BLOCK], minimum[:, column // BLOCK]  # [rows] each
            inverse = torch.where(s > 0, 1 / s, torch.zeros_like(s))
            q = torch.floor((w[:, column] - m) * inverse + 0.5).clamp(0, Q4_MAX)  # [rows]
            levels[:, column] = q.to(torch.uint8)
            error = (w[:, column] - (q * s + m)) / factor[column, column]  # [rows]
            w[:, column + 1 : end] -= error[:, None] * factor[column, column + 1 : end]
            errors[:, column - start] = error
        w[:, end:] -= errors @ factor[start:end, end:]
    return pack_levels(levels), scale.half(), minimum.half()
