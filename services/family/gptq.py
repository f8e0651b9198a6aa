"""Weights rounded with error feedback (GPTQ, Frantar et al. 2022): a matrix's input columns are rounded one at
a time, and each column's rounding error is pushed onto the columns not yet rounded, weighted by how the inputs
co-vary on calibration text (`hessian`, the mean of x xᵀ), so the layer's outputs, not its weights, stay close.
Two grids: 4-bit blocks (each block of 32 takes its scale and minimum when its first column is reached, from
the weights as the earlier errors left them) and int8 rows (one scale per row, from the row as it came)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from services.cpu.fast_linear import native_kernels_wanted
from services.cpu.kernels.gptq_loop import load_round_blocks, load_round_columns
from services.family.int8_rows import Q8_MAX, quantize_rows
from services.family.q4_blocks import BLOCK, Q4_MAX, fit_blocks, fit_steps, inverse_scale, pack_levels

DAMPING = 0.01  # of the mean diagonal, added to it: keeps the inverse defined where inputs never vary
COLUMNS_PER_UPDATE = 128  # columns whose errors are pushed onto the rest in one matrix product (a multiple of 32)


class InputStats:
    """What GPTQ knows of a matrix's inputs: `hessian` [n, n], their mean x xᵀ on calibration text. Matrices
    that read the same input (q/k/v, gate/up) share one, and so its factor."""

    def __init__(self, hessian: torch.Tensor):
        self.hessian = hessian.float().cpu()  # [n, n]

    @cached_property
    def factor(self) -> torch.Tensor:
        """Upper Cholesky factor U [n, n] of the damped hessian's inverse (Uᵀ U = H⁻¹): row i holds how column
        i's error is spread over the columns after it. With H = R Rᵀ, R upper (Cholesky in reversed order),
        U = R⁻¹: one factorization and one triangular solve, in fp32 unless H is too near singular for it."""
        n = self.hessian.shape[0]
        lower, failed = torch.linalg.cholesky_ex(self._damped(torch.float32).flip(0, 1))  # [n, n]
        if failed:
            lower = torch.linalg.cholesky(self._damped(torch.float64).flip(0, 1))
        upper = lower.flip(0, 1)  # [n, n]: H = upper upperᵀ
        identity = torch.eye(n, dtype=upper.dtype)
        return torch.linalg.solve_triangular(upper, identity, upper=True).float().contiguous()  # [n, n]

    def _damped(self, dtype: torch.dtype) -> torch.Tensor:
        n = self.hessian.shape[0]
        diagonal = self.hessian.diagonal().to(dtype)
        damped = self.hessian.to(dtype) + DAMPING * diagonal.mean() * torch.eye(n, dtype=dtype)  # [n, n]
        dead = diagonal == 0  # inputs that are always zero carry no error either way
        damped[dead, dead] = 1
        return damped


@dataclass
class Grid:
    """Where a range of columns rounds to, per row [rows] each: level = clamp(floor((w - minimum) * inverse +
    0.5), low, high), back as level * scale + minimum."""

    scale: torch.Tensor
    minimum: torch.Tensor
    inverse: torch.Tensor  # 1 / scale, 0 where the scale is 0
    low: float
    high: float


# One group of columns: (columns [n, rows], factor [n, n], start, end, levels [end - start, rows], errors [end -
# start, rows]) -> None, each column of the group rounded and its error pushed onto the group's later columns.
RoundGroup = Callable[[torch.Tensor, torch.Tensor, int, int, torch.Tensor, torch.Tensor], None]


def round_columns(columns: torch.Tensor, factor: torch.Tensor, start: int, stop: int, update_end: int, grid: Grid,
                  levels: torch.Tensor, errors: torch.Tensor) -> None:
    """Columns `start` to `stop` of columns [n, rows] rounded to `grid`, levels [stop - start, rows] and errors
    (each over its pivot) [stop - start, rows] written, each error pushed onto the columns after it up to
    `update_end`. The kernel (`services/cpu/kernels/gptq_loop.cpp`) computes the same in C++."""
    kernel = load_round_columns() if native_kernels_wanted() else None
    if kernel is not None:
        kernel(columns, factor, start, stop, update_end, grid.scale, grid.minimum, grid.inverse, grid.low, grid.high,
               levels, errors)
        return
    for column in range(start, stop):
        level = levels[column - start]  # [rows], a view
        torch.sub(columns[column], grid.minimum, out=level).mul_(grid.inverse).add_(0.5).floor_()
        level.clamp_(grid.low, grid.high)
        error = errors[column - start]  # [rows], a view
        torch.sub(columns[column], level * grid.scale + grid.minimum, out=error).div_(factor[column, column])
        columns[column + 1 : update_end].addr_(factor[column, column + 1 : update_end], error, alpha=-1)


def round_with_feedback(weight: torch.Tensor, inputs: InputStats, round_group: RoundGroup) -> torch.Tensor:
    """GPTQ's column loop over weight [rows, n] (fp32, on the CPU), a group of `COLUMNS_PER_UPDATE` columns at a
    time (`round_group`), each group's errors then pushed onto all later columns in one matrix product: levels
    [n, rows] (as floats)."""
    rows, n = weight.shape
    columns = weight.T.clone(memory_format=torch.contiguous_format)  # [n, rows]: a column's weights side by side
    factor = inputs.factor  # [n, n]
    levels = torch.empty(n, rows)
    for start in range(0, n, COLUMNS_PER_UPDATE):
        end = min(start + COLUMNS_PER_UPDATE, n)
        errors = torch.empty(end - start, rows)  # [columns, rows], each over its pivot
        round_group(columns, factor, start, end, levels[start:end], errors)
        columns[end:] -= factor[start:end, end:].T @ errors
    return levels


def gptq_blocks(weight: torch.Tensor, inputs: InputStats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed uint8 [rows, n / 2], scale fp16 [rows, n / 32], minimum fp16 [rows, n / 32]) as
    `services.family.q4_blocks.quantize_blocks` returns them, for weight [rows, n]: each block's scale and
    minimum fitted (`fit_blocks`) from the weights as the loop reaches its first column."""
    rows, n = weight.shape
    device, weight = weight.device, weight.detach().float().cpu()
    importance = inputs.hessian.diagonal().contiguous()  # [n]
    scale, minimum = torch.empty(rows, n // BLOCK), torch.empty(rows, n // BLOCK)
    kernel = load_round_blocks() if native_kernels_wanted() else None
    steps = fit_steps()  # [FIT_STEPS]

    def round_group(columns, factor, start, end, levels, errors) -> None:
        if kernel is not None:
            return kernel(columns, factor, importance, steps, start, end, scale, minimum, levels, errors)
        for first in range(start, end, BLOCK):
            block, in_group = slice(first, first + BLOCK), slice(first - start, first - start + BLOCK)
            s, m = fit_blocks(columns[block].T[:, None], importance[None, block])  # [rows, 1] each
            scale[:, first // BLOCK], minimum[:, first // BLOCK] = s[:, 0], m[:, 0]
            grid = Grid(s[:, 0].contiguous(), m[:, 0].contiguous(), inverse_scale(s[:, 0]), 0, Q4_MAX)
            round_columns(columns, factor, first, first + BLOCK, end, grid, levels[in_group], errors[in_group])

    levels = round_with_feedback(weight, inputs, round_group)  # [n, rows]
    packed = pack_levels(levels.T.to(torch.uint8).contiguous())
    return packed.to(device), scale.half().to(device), minimum.half().to(device)


def gptq_rows(weight: torch.Tensor, inputs: InputStats) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [rows, n], scale fp32 [rows]) as `services.family.int8_rows.quantize_rows` returns them, each
    row's scale its own, for weight [rows, n]."""
    device, weight = weight.device, weight.detach().float().cpu()
    _, scale = quantize_rows(weight)
    grid = Grid(scale, torch.zeros_like(scale), 1 / scale, -Q8_MAX, Q8_MAX)  # one grid for every column

    def round_group(columns, factor, start, end, levels, errors) -> None:
        round_columns(columns, factor, start, end, end, grid, levels, errors)

    levels = round_with_feedback(weight, inputs, round_group)  # [n, rows]
    return levels.T.contiguous().to(device=device, dtype=torch.int8), scale.to(device)
