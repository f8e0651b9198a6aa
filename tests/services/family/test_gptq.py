import pytest
import torch

from services.cpu.fast_linear import ENV_SWITCH
from services.cpu.kernels.gptq_loop import load_round_columns
from services.family import gptq
from services.family.gptq import InputStats, gptq_blocks, gptq_rows
from services.family.int8_rows import dequantize_rows, quantize_rows
from services.family.q4_blocks import BLOCK, Q4_MAX, dequantize_blocks, fit_blocks, quantize_blocks


def _correlated_inputs(n: int, tokens: int = 2048, seed: int = 0) -> torch.Tensor:
    """[tokens, n] inputs whose features co-vary and run at different sizes, as a layer's inputs do."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n, n, generator=generator) / n**0.5 + torch.eye(n)  # [n, n]
    sizes = torch.logspace(-1, 0.5, n)[torch.randperm(n, generator=generator)]  # [n]
    return (torch.randn(tokens, n, generator=generator) * sizes) @ mixing  # [tokens, n]


def _reference(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """GPTQ as the paper writes it: one column at a time, its error pushed onto every later column at once."""
    w, n = weight.clone().float(), weight.shape[1]
    factor, importance = InputStats(hessian).factor, hessian.diagonal().float()
    out = torch.empty_like(w)
    for column in range(n):
        if column % BLOCK == 0:
            scale, minimum = fit_blocks(w[:, None, column : column + BLOCK].float(),
                                        importance[None, column : column + BLOCK])  # [rows, 1] each
            scale, minimum = scale[:, 0], minimum[:, 0]
        inverse = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        out[:, column] = torch.floor((w[:, column] - minimum) * inverse + 0.5).clamp(0, Q4_MAX) * scale + minimum
        error = (w[:, column] - out[:, column]) / factor[column, column]  # [rows]
        w[:, column:] -= error[:, None] * factor[column, column:]
    return out


def test_blocked_updates_match_the_column_by_column_algorithm(monkeypatch):
    monkeypatch.setattr(gptq, "COLUMNS_PER_UPDATE", 64)  # several update blocks in a 192-wide matrix
    x = _correlated_inputs(192)  # [tokens, 192]
    hessian = x.T @ x / x.shape[0]  # [192, 192]
    weight = torch.randn(40, 192, generator=torch.Generator().manual_seed(1)) * 0.1  # [40, 192]
    ours = dequantize_blocks(*gptq_blocks(weight, InputStats(hessian)), torch.float32)  # [40, 192]
    want = _reference(weight, hessian)

    def calibration_error(quantized: torch.Tensor) -> float:  # the outputs' squared error on the calibration x
        return float(torch.einsum("ri,ij,rj->", quantized - weight, hessian, quantized - weight))

    # the two orders of summation round a few ties the other way, and the errors they push on differ after
    assert int(((ours - want).abs() > 1e-4).sum()) <= weight.numel() // 50
    assert abs(calibration_error(ours) / calibration_error(want) - 1) < 0.01
    ranged = dequantize_blocks(*quantize_blocks(weight), torch.float32)
    assert calibration_error(ours) < 0.5 * calibration_error(ranged)


def test_weights_on_the_4_bit_grid_come_back_exactly():
    weight = torch.randn(16, 128, generator=torch.Generator().manual_seed(2))  # [16, 128]
    on_grid = quantize_blocks(weight)
    x = _correlated_inputs(128)
    again = gptq_blocks(dequantize_blocks(*on_grid, torch.float32), InputStats(x.T @ x / x.shape[0]))
    assert all(torch.equal(a, b) for a, b in zip(again, on_grid))


def test_outputs_on_unseen_inputs_err_less_than_with_blocks_rounded_alone():
    inputs = _correlated_inputs(256, tokens=4096, seed=3)  # [4096, 256]
    x, unseen = inputs[:2048], inputs[2048:]  # calibration, and inputs the fit never saw
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(4)) * 0.05  # [64, 256]
    hessian = x.T @ x / x.shape[0]  # [256, 256]
    ours = dequantize_blocks(*gptq_blocks(weight, InputStats(hessian)), torch.float32)
    ranged = dequantize_blocks(*quantize_blocks(weight), torch.float32)
    fitted_alone = _fitted_alone(weight, hessian.diagonal())

    def output_error(quantized: torch.Tensor) -> float:
        return float(((unseen @ (quantized - weight).T) ** 2).mean())

    assert output_error(ours) < 0.7 * output_error(fitted_alone) < 0.7 * output_error(ranged)


def _fitted_alone(weight: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    rows, n = weight.shape
    blocks = weight.view(rows, n // BLOCK, BLOCK)
    scale, minimum = fit_blocks(blocks, importance.view(n // BLOCK, BLOCK))  # [rows, nb] each
    levels = torch.floor((blocks - minimum[..., None]) / scale[..., None] + 0.5).clamp(0, Q4_MAX)
    return (levels * scale[..., None] + minimum[..., None]).view(rows, n)


def test_int8_rows_keep_their_scales_and_err_less_on_unseen_inputs():
    inputs = _correlated_inputs(128, tokens=4096, seed=5)  # [4096, 128]
    x, unseen = inputs[:2048], inputs[2048:]
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(6)) * 0.05  # [48, 128]
    q, scale = gptq_rows(weight, InputStats(x.T @ x / x.shape[0]))
    nearest_q, nearest_scale = quantize_rows(weight)
    assert torch.equal(scale, nearest_scale) and not torch.equal(q, nearest_q)
    assert q.is_contiguous()  # the kernels read rows in place

    def output_error(q: torch.Tensor) -> float:
        return float(((unseen @ (dequantize_rows(q, scale, torch.float32) - weight).T) ** 2).mean())

    assert output_error(q) < 0.7 * output_error(nearest_q)
    on_grid = dequantize_rows(nearest_q, scale, torch.float32)  # rows already on their grid stay there
    assert torch.equal(gptq_rows(on_grid, InputStats(x.T @ x / x.shape[0]))[0], nearest_q)


def test_the_weight_given_is_left_as_it_was():
    x = _correlated_inputs(64, tokens=256)
    for rows in (1, 5):  # one row: its transpose is already contiguous, and must still be copied
        weight = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows))  # [rows, 64]
        before = weight.clone()
        gptq_blocks(weight, InputStats(x.T @ x / x.shape[0]))
        gptq_rows(weight, InputStats(x.T @ x / x.shape[0]))
        assert torch.equal(weight, before)


def test_the_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    x = _correlated_inputs(96, tokens=512)
    x[:, 5] = 0  # an input that never varies
    stats = InputStats(x.T @ x / x.shape[0])
    damped = stats.hessian.double() + gptq.DAMPING * stats.hessian.diagonal().mean().double() * torch.eye(96).double()
    damped[5, 5] = 1
    factor = stats.factor  # [96, 96]
    assert torch.equal(factor, factor.triu()) and bool((factor.diagonal() > 0).all())
    torch.testing.assert_close(factor.double().T @ factor.double(), torch.linalg.inv(damped), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(load_round_columns() is None, reason="native kernels cannot be built here")
@pytest.mark.parametrize("form", ["blocks", "rows"])
def test_the_native_loop_rounds_as_the_python_loop_does(form, monkeypatch):
    x = _correlated_inputs(320, seed=7)  # [tokens, 320]: two full update groups and a part
    stats = InputStats(x.T @ x / x.shape[0])
    weight = torch.randn(70, 320, generator=torch.Generator().manual_seed(8)) * 0.05  # rows not a multiple of chunks
    quantize, dequantize = {"blocks": (gptq_blocks, dequantize_blocks), "rows": (gptq_rows, dequantize_rows)}[form]
    native = dequantize(*quantize(weight, stats), torch.float32)
    monkeypatch.setenv(ENV_SWITCH, "0")
    python = dequantize(*quantize(weight, stats), torch.float32)

    def calibration_error(quantized: torch.Tensor) -> float:
        return float(torch.einsum("ri,ij,rj->", quantized - weight, stats.hessian, quantized - weight))

    # sums in another order settle a rare near-tie of two fits the other way, and the row's later columns
    # take other errors after it (the fits themselves: tests/services/cpu/kernels/test_gptq_loop.py)
    assert int(((native - python).abs() > 1e-5).sum()) <= weight.numel() // 20
    assert abs(calibration_error(native) / calibration_error(python) - 1) < 0.01
