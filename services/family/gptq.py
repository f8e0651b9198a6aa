"""Weights rounded with error feedback (GPTQ, Frantar et al. 2022): a matrix's input columns are rounded one at
a time, and each column's rounding error is pushed onto the columns not yet rounded, weighted by how the inputs
co-vary on calibration text (`hessian`, the mean of x xᵀ), so the layer's outputs, not its weights, stay close.
Two grids: 4-bit blocks (each block of 32 takes its scale and minimum when its first column is reached, from
the weights as the earlier errors left them) and int8 rows (one scale per row, from the row as it came)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.family.int8_rows import Q8_MAX, quantize_rows
from services.family.q4_blocks import BLOCK, Q4_MAX, fit_blocks, pack_levels

DAMPING = 0.01  # of the mean diagonal, added to it: keeps the inverse defined where inputs never vary
COLUMNS_PER_UPDATE = 128  # columns whose errors are pushed onto the rest in one matrix product (a multiple of 32)


def inverse_factor(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor [n, n] of the damped `hessian`'s inverse: row i holds how column i's error is
    spread over the columns after it."""
    n = hessian.shape[0]
    damped = hessian.double() + DAMPING * hessian.diagonal().mean().double() * torch.eye(n, dtype=torch.float64)
    dead = hessian.diagonal() == 0  # inputs that are always zero carry no error either way
    damped[dead, dead] = 1
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))  # [n, n]
    return torch.linalg.cholesky(inverse, upper=True).float()  # [n, n]


def round_with_feedback(
    weight: torch.Tensor, hessian: torch.Tensor, round_column: Callable[[torch.Tensor, int], torch.Tensor]
) -> None:
    """GPTQ's column loop over weight [rows, n] (fp32, on the CPU): `round_column(w, column)` returns column
    `column` of `w` rounded [rows], where `w` [rows, n] holds the weights as the earlier columns' errors left
    them (current from `column` to the end of its group of `COLUMNS_PER_UPDATE`)."""
    rows, n = weight.shape
    columns = weight.T.contiguous()  # [n, rows]: a column's weights side by side
    w = columns.T  # [rows, n], a view
    factor = inverse_factor(hessian)  # [n, n]
    for start in range(0, n, COLUMNS_PER_UPDATE):
        end = min(start + COLUMNS_PER_UPDATE, n)
        errors = torch.empty(end - start, rows)  # [columns, rows], each over its pivot
        for column in range(start, end):
            error = (columns[column] - round_column(w, column)) / factor[column, column]  # [rows]
            columns[column + 1 : end] -= factor[column, column + 1 : end, None] * error
            errors[column - start] = error
        columns[end:] -= factor[start:end, end:].T @ errors


def gptq_blocks(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [rows, n / 2], scale fp16 [rows, n / 32], minimum fp16 [rows, n / 32]) as
    `services.family.q4_blocks.quantize_blocks` returns them, for weight [rows, n] and `hessian` [n, n]."""
    rows, n = weight.shape
    device, weight, hessian = weight.device, weight.detach().float().cpu(), hessian.float().cpu()
    importance = hessian.diagonal()  # [n]
    levels = torch.empty(rows, n, dtype=torch.uint8)
    scale, minimum = torch.empty(rows, n // BLOCK), torch.empty(rows, n // BLOCK)

    def round_column(w: torch.Tensor, column: int) -> torch.Tensor:
        group = column // BLOCK
        if column % BLOCK == 0:
            s, m = fit_blocks(w[:, None, column : column + BLOCK], importance[None, column : column + BLOCK])
            scale[:, group], minimum[:, group] = s[:, 0], m[:, 0]
        s, m = scale[:, group], minimum[:, group]  # [rows] each
        inverse = torch.where(s > 0, 1 / s, torch.zeros_like(s))
        q = torch.floor((w[:, column] - m) * inverse + 0.5).clamp(0, Q4_MAX)  # [rows]
        levels[:, column] = q.to(torch.uint8)
        return q * s + m

    round_with_feedback(weight, hessian, round_column)
    return pack_levels(levels).to(device), scale.half().to(device), minimum.half().to(device)


def gptq_rows(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [rows, n], scale fp32 [rows]) as `services.family.int8_rows.quantize_rows` returns them, each row's
    scale its own, for weight [rows, n] and `hessian` [n, n]."""
    device, weight, hessian = weight.device, weight.detach().float().cpu(), hessian.float().cpu()
    q, scale = quantize_rows(weight)

    def round_column(w: torch.Tensor, column: int) -> torch.Tensor:
        q[:, column] = torch.round(w[:, column] / scale).clamp(-Q8_MAX, Q8_MAX).to(torch.int8)
        return q[:, column].float() * scale

    round_with_feedback(weight, hessian, round_column)
    return q.to(device), scale.to(device)
