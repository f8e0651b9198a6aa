"""Weights rounded with error feedback (GPTQ, Frantar et al. 2022): a matrix's input columns are rounded one at
a time, and each column's rounding error is pushed onto the columns not yet rounded, weighted by how the inputs
co-vary on calibration text (`hessian`, the mean of x xᵀ), so the layer's outputs, not its weights, stay close.
Two grids: 4-bit blocks (each block of 32 takes its scale and minimum when its first column is reached, from
the weights as the earlier errors left them) and int8 rows (one scale per row, from the row as it came)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property

import torch

from services.family.int8_rows import Q8_MAX, quantize_rows
from services.family.q4_blocks import BLOCK, Q4_MAX, fit_blocks, inverse_scale, pack_levels

DAMPING = 0.01  # of the mean diagonal, added to it: keeps the inverse defined where inputs never vary
COLUMNS_PER_UPDATE = 128  # columns whose errors are pushed onto the rest in one matrix product (a multiple of 32)


class InputStats:
    """What GPTQ knows of a matrix's inputs: `hessian` [n, n], their mean x xᵀ on calibration text. Matrices
    that read the same input (q/k/v, gate/up) share one, and so its factor."""

    def __init__(self, hessian: torch.Tensor):
        self.hessian = hessian.float().cpu()  # [n, n]

    @cached_property
    def factor(self) -> torch.Tensor:
        """Upper Cholesky factor [n, n] of the damped hessian's inverse: row i holds how column i's error is
        spread over the columns after it."""
        n = self.hessian.shape[0]
        diagonal = self.hessian.diagonal()
        damped = self.hessian.double() + DAMPING * diagonal.mean().double() * torch.eye(n, dtype=torch.float64)
        dead = diagonal == 0  # inputs that are always zero carry no error either way
        damped[dead, dead] = 1
        inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))  # [n, n]
        return torch.linalg.cholesky(inverse, upper=True).float()  # [n, n]


def round_with_feedback(
    weight: torch.Tensor, inputs: InputStats, round_column: Callable[[torch.Tensor, int], torch.Tensor]
) -> None:
    """GPTQ's column loop over weight [rows, n] (fp32, on the CPU): `round_column(w, column)` returns column
    `column` of `w` rounded [rows], where `w` [rows, n] holds the weights as the earlier columns' errors left
    them (current from `column` to the end of its group of `COLUMNS_PER_UPDATE`)."""
    rows, n = weight.shape
    columns = weight.T.clone(memory_format=torch.contiguous_format)  # [n, rows]: a column's weights side by side
    w = columns.T  # [rows, n], a view
    factor = inputs.factor  # [n, n]
    pivots = factor.diagonal()  # [n]
    for start in range(0, n, COLUMNS_PER_UPDATE):
        end = min(start + COLUMNS_PER_UPDATE, n)
        errors = torch.empty(end - start, rows)  # [columns, rows], each over its pivot
        for column in range(start, end):
            error = errors[column - start]  # [rows], a view
            torch.sub(columns[column], round_column(w, column), out=error).div_(pivots[column])
            columns[column + 1 : end].addr_(factor[column, column + 1 : end], error, alpha=-1)
        columns[end:] -= factor[start:end, end:].T @ errors


def gptq_blocks(weight: torch.Tensor, inputs: InputStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [rows, n / 2], scale fp16 [rows, n / 32], minimum fp16 [rows, n / 32]) as
    `services.family.q4_blocks.quantize_blocks` returns them, for weight [rows, n]."""
    rows, n = weight.shape
    device, weight = weight.device, weight.detach().float().cpu()
    importance = inputs.hessian.diagonal()  # [n]
    levels = torch.empty(rows, n, dtype=torch.uint8)
    scale, minimum = torch.empty(rows, n // BLOCK), torch.empty(rows, n // BLOCK)
    inverse = torch.empty(rows)  # the current block's 1 / scale (0 for a block of equal weights)

    def round_column(w: torch.Tensor, column: int) -> torch.Tensor:
        group = column // BLOCK
        if column % BLOCK == 0:
            s, m = fit_blocks(w[:, None, column : column + BLOCK], importance[None, column : column + BLOCK])
            scale[:, group], minimum[:, group] = s[:, 0], m[:, 0]
            inverse.copy_(inverse_scale(s[:, 0]))
        s, m = scale[:, group], minimum[:, group]  # [rows] each
        q = (w[:, column] - m).mul_(inverse).add_(0.5).floor_().clamp_(0, Q4_MAX)  # [rows]
        levels[:, column] = q
        return q.mul_(s).add_(m)

    round_with_feedback(weight, inputs, round_column)
    return pack_levels(levels).to(device), scale.half().to(device), minimum.half().to(device)


def gptq_rows(weight: torch.Tensor, inputs: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [rows, n], scale fp32 [rows]) as `services.family.int8_rows.quantize_rows` returns them, each
    row's scale its own, for weight [rows, n]."""
    device, weight = weight.device, weight.detach().float().cpu()
    _, scale = quantize_rows(weight)
    levels = torch.empty(weight.shape[1], weight.shape[0])  # [n, rows]

    def round_column(w: torch.Tensor, column: int) -> torch.Tensor:
        level = torch.div(w[:, column], scale, out=levels[column]).round_().clamp_(-Q8_MAX, Q8_MAX)  # [rows]
        return level * scale

    round_with_feedback(weight, inputs, round_column)
    return levels.T.contiguous().to(device=device, dtype=torch.int8), scale.to(device)
