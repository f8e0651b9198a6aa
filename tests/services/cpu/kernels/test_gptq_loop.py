import pytest
import torch

from services.cpu.fast_linear import ENV_SWITCH
from services.cpu.kernels.gptq_loop import load_round_blocks, load_round_columns
from services.family import gptq
from services.family.gptq import Grid, InputStats
from services.family.q4_blocks import BLOCK, Q4_MAX, _weighted_error, fit_blocks, fit_steps, inverse_scale

pytestmark = pytest.mark.skipif(load_round_blocks() is None, reason="native kernels cannot be built here")


def _blocks_without_feedback(weight: torch.Tensor, importance: torch.Tensor):
    """The kernel's (scale, minimum [rows, nb], levels [n, rows]) with an identity factor: no error is pushed on,
    so each block is its fit and its rounding alone."""
    rows, n = weight.shape
    scale, minimum = torch.empty(rows, n // BLOCK), torch.empty(rows, n // BLOCK)
    levels, errors = torch.empty(n, rows), torch.empty(n, rows)
    columns = weight.T.contiguous()  # [n, rows]
    load_round_blocks()(columns, torch.eye(n), importance, fit_steps(), 0, n, scale, minimum, levels, errors)
    return scale, minimum, levels


def test_the_kernel_fits_blocks_as_fit_blocks_does():
    rows, n = 300, 256
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(rows, n, generator=generator) * 0.05  # [rows, n]
    weight[3, :BLOCK] = 0.25  # a block of equal weights
    importance = torch.rand(n, generator=generator) * 3  # [n]
    scale, minimum, levels = _blocks_without_feedback(weight, importance)
    want_scale, want_minimum = fit_blocks(weight.view(rows, n // BLOCK, BLOCK), importance.view(n // BLOCK, BLOCK))
    other = (scale != want_scale) | (minimum != want_minimum)  # [rows, nb]
    assert int(other.sum()) <= other.numel() // 100  # near-ties, settled by sums in another order
    blocks = weight.view(rows, n // BLOCK, BLOCK)[other]  # [other, 32]
    weights = importance.view(n // BLOCK, BLOCK)[other.nonzero()[:, 1]]  # [other, 32]
    ours = _weighted_error(blocks, weights, scale[other][:, None], minimum[other][:, None])[0]
    theirs = _weighted_error(blocks, weights, want_scale[other][:, None], want_minimum[other][:, None])[0]
    torch.testing.assert_close(ours, theirs, rtol=1e-2, atol=0)
    assert scale[3, 0] == 0 and minimum[3, 0] == torch.tensor(0.25).half().float()
    # levels: each weight rounded to its own block's grid
    inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale)).repeat_interleave(BLOCK, dim=1)  # [rows, n]
    low = minimum.repeat_interleave(BLOCK, dim=1)
    assert torch.equal(levels.T, torch.floor((weight - low) * inverse + 0.5).clamp(0, Q4_MAX))


def test_the_kernel_pushes_each_error_onto_the_later_columns_of_its_group():
    rows, n = 40, 8
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(rows, n, generator=generator)  # [rows, n]
    factor = torch.randn(n, n, generator=generator).triu() + 3 * torch.eye(n)  # [n, n]
    scale = weight.abs().amax(dim=1) / 127  # [rows]
    columns, levels, errors = weight.T.contiguous(), torch.empty(5, rows), torch.empty(5, rows)
    load_round_columns()(columns, factor, 0, 5, 6, scale, torch.zeros(rows), 1 / scale, -127.0, 127.0, levels, errors)
    w = weight.T.clone()  # [n, rows]: the loop written out
    for c in range(5):
        want = torch.floor(w[c] / scale + 0.5).clamp(-127, 127)
        torch.testing.assert_close(levels[c], want, rtol=0, atol=0)
        error = (w[c] - want * scale) / factor[c, c]
        torch.testing.assert_close(errors[c], error)
        w[c + 1 : 6] -= factor[c, c + 1 : 6, None] * error
    torch.testing.assert_close(columns, w)  # column 6 onwards untouched: past `update_end`


def test_a_later_group_of_blocks_is_rounded_as_the_torch_loop_rounds_it(monkeypatch):
    rows, n, start, end = 70, 256, 64, 192  # rows not a multiple of the kernel's chunks; a group past the first
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(1024, n, generator=generator) @ (torch.randn(n, n, generator=generator) / n**0.5 + torch.eye(n))
    stats = InputStats(x.T @ x / x.shape[0])
    importance = stats.hessian.diagonal().contiguous()  # [n]
    weight = torch.randn(rows, n, generator=generator) * 0.05  # [rows, n]

    native = weight.T.contiguous()  # [n, rows]
    scale, minimum = torch.zeros(rows, n // BLOCK), torch.zeros(rows, n // BLOCK)
    levels, errors = torch.empty(end - start, rows), torch.empty(end - start, rows)
    load_round_blocks()(native, stats.factor, importance, fit_steps(), start, end, scale, minimum, levels, errors)

    monkeypatch.setenv(ENV_SWITCH, "0")  # gptq.round_columns in torch
    python = weight.T.contiguous()
    want_levels, want_errors = torch.empty(end - start, rows), torch.empty(end - start, rows)
    for first in range(start, end, BLOCK):
        s, m = fit_blocks(python[first : first + BLOCK].T[:, None], importance[None, first : first + BLOCK])
        grid = Grid(s[:, 0].contiguous(), m[:, 0].contiguous(), inverse_scale(s[:, 0]), 0, Q4_MAX)
        here = slice(first - start, first - start + BLOCK)
        gptq.round_columns(python, stats.factor, first, first + BLOCK, end, grid, want_levels[here], want_errors[here])
        assert torch.equal(scale[:, first // BLOCK], s[:, 0]) and torch.equal(minimum[:, first // BLOCK], m[:, 0])

    assert not scale[:, : start // BLOCK].any() and not scale[:, end // BLOCK :].any()  # only the group's blocks
    assert torch.equal(native[:start], python[:start]) and torch.equal(native[end:], weight.T[end:])
    torch.testing.assert_close(levels, want_levels, rtol=0, atol=0)
    torch.testing.assert_close(errors, want_errors, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(native, python, rtol=1e-5, atol=1e-6)
