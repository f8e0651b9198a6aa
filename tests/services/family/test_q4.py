"""4-bit weights: the block quantizer (lossless on blocks it made), the 4-bit GEMV kernel against the same
arithmetic in torch, and a 4-bit family through both decode backends and against its dequantized reference."""

import logging

import pytest
import torch
from torch import nn

from services.cpu.kernels.gemv import load_gemv_q4
from services.engine.backends import native as native_backend
from services.engine.backends.native import NativeStep
from services.engine.backends.torch_layers import LayerStep
from services.family import calibration, load_family
from services.family import q4 as q4_module
from services.family.int8 import Int8Embedding, Int8Linear
from services.family.int8_rows import dequantize_rows, quantize_rows
from services.family.q4 import Q4Linear
from services.family.q4_blocks import BLOCK, dequantize_blocks, fit_blocks, quantize_blocks
from tests.services.engine.backends.test_native import _run
from tests.services.engine.reference import forward_logits

PROMPT = [5, 17, 42, 99, 7, 3, 250, 61]


def test_blocks_round_to_within_half_a_step_and_come_back_to_themselves():
    weight = torch.randn(7, 192) * torch.logspace(-3, 1, 7)[:, None]  # [7, 192], rows of very different size
    weight[2, :BLOCK] = 0.5  # a constant block keeps a usable scale
    packed, scale, minimum = quantize_blocks(weight)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 96) and scale.shape == minimum.shape == (7, 6)
    back = dequantize_blocks(packed, scale, minimum, torch.float32)  # [7, 192]
    step = scale.float().repeat_interleave(BLOCK, dim=1)  # [7, 192]
    assert bool(((back - weight).abs() <= step / 2 + 1e-3 * weight.abs().amax(dim=1, keepdim=True)).all())
    assert torch.equal(back[2, :BLOCK], torch.full((BLOCK,), 0.5))
    again = quantize_blocks(back)  # a Q4_1 teacher, dequantized on import, gets its own blocks back
    assert all(torch.equal(a, b) for a, b in zip(again, (packed, scale, minimum)))
    assert torch.equal(dequantize_blocks(*again, torch.float32), back)


def _reference(x: torch.Tensor, packed, scale, minimum) -> torch.Tensor:
    """y [rows, out] as the kernel computes it: the input quantized to 8 bits per block of 32 (scale = the
    block's largest magnitude / 127, rounded to nearest), integer dots, then both scales and the minimum."""
    rows, width = x.shape
    blocks = x.reshape(rows, width // BLOCK, BLOCK)  # [rows, nb, 32]
    x_scale = blocks.abs().amax(dim=-1) / 127  # [rows, nb]
    inverse = torch.where(x_scale > 0, 1 / x_scale, torch.zeros_like(x_scale))
    xq = torch.round(blocks * inverse[..., None]).double()  # [rows, nb, 32]
    q = dequantize_blocks(packed, torch.ones_like(scale), torch.zeros_like(minimum), torch.float64)  # [out, in]
    dots = torch.einsum("rbk,obk->rob", xq, q.reshape(-1, width // BLOCK, BLOCK))  # [rows, out, nb]
    scaled = dots * scale.double()[None] * x_scale.double()[:, None]  # [rows, out, nb]
    offsets = minimum.double()[None] * blocks.sum(dim=-1).double()[:, None]  # [rows, out, nb]
    return (scaled + offsets).sum(dim=-1).float()  # [rows, out]


@pytest.mark.skipif(load_gemv_q4() is None, reason="no C++ compiler or no AVX2/FMA here")
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"),
    [(1, 576, 576), (3, 13, 64), (8, 1536, 576), (16, 9, 1600), (5, 17, 192), (1, 4099, 64)],
)
def test_q4_kernel_one_row_on_8_bit_inputs_and_several_on_the_dequantized_weights(rows, out_features, in_features):
    generator = torch.Generator().manual_seed(rows * out_features + in_features)
    x = torch.randn(rows, in_features, generator=generator)  # [rows, in]
    x[0, :BLOCK] = 0  # an all-zero input block
    weights = quantize_blocks(torch.randn(out_features, in_features, generator=generator))
    bias = torch.randn(out_features, generator=generator)
    got = load_gemv_q4()(x, *weights, bias)  # [rows, out]
    alone = torch.cat([load_gemv_q4()(x[i : i + 1], *weights, bias) for i in range(rows)])  # [rows, out]
    torch.testing.assert_close(alone, _reference(x, *weights) + bias, rtol=1e-5, atol=1e-4)
    if rows > 1:
        dense = dequantize_blocks(*weights, torch.float64)  # [out, in]
        torch.testing.assert_close(got, (x.double() @ dense.T + bias).float(), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got, alone, rtol=0, atol=0.02 * float(got.abs().max()))  # 8-bit inputs: near


def test_shared_tensors_stay_shared_and_matrices_take_five_bits_a_weight(llama_pair):
    full = load_family(*llama_pair, device="cpu")
    q4 = load_family(*llama_pair, device="cpu", weights="q4")
    assert q4.weights == "q4" and full.weights == "float"
    teacher = q4.teacher
    assert type(teacher.model.embed_tokens) is Int8Embedding and type(teacher.lm_head) is Int8Linear
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight  # tied: one int8 tensor
    matrices = [m for model in (q4.teacher, q4.student) for m in model.modules() if type(m) is Q4Linear]
    teacher_layers, student_layers = full.teacher.config.num_hidden_layers, full.student.config.num_hidden_layers
    assert len(matrices) == 7 * teacher_layers + 5 * student_layers  # the student's v_proj and down_proj: int8
    wider = [name for name, m in q4.student.named_modules() if type(m) is Int8Linear and "layers" in name]
    assert len(wider) == 2 * student_layers and all(n.endswith(("v_proj", "down_proj")) for n in wider)
    distinct = {m.weight.data_ptr(): m for m in matrices}
    for m in distinct.values():
        stored = m.weight.nbytes + m.weight_scale.nbytes + m.weight_min.nbytes
        assert stored * 32 == m.in_features * m.out_features * 4 * 5  # 4 bits + 16 + 16 bits per 32 weights
    before = {id(p) for model in (full.teacher, full.student) for p in model.parameters()}
    after = {id(p) for model in (q4.teacher, q4.student) for p in model.parameters()}
    assert len(after) == len(before)  # each shared tensor quantized once


@pytest.mark.parametrize("with_join", [False, True])
def test_native_and_torch_backends_agree_on_a_q4_pair(llama_pair, with_join, monkeypatch):
    """The decoder-step kernel against the layers' own forward, both over the 4-bit GEMV's arithmetic: logits
    close, not equal, since a last-bit difference in a norm can move an input across a rounding step of its
    8-bit block; so greedy tokens may part only where the two best logits are within that tolerance."""
    native = load_family(*llama_pair, device="cpu", weights="q4")
    native_tokens, native_logits, native_backends = _run(native, with_join)
    monkeypatch.setattr(native_backend, "layer_stack", lambda *args: None)
    layers = load_family(*llama_pair, device="cpu", weights="q4")
    layer_tokens, layer_logits, layer_backends = _run(layers, with_join)
    assert native_backends == {NativeStep} and layer_backends == {LayerStep}
    compared = 0
    for ours_tokens, theirs_tokens, ours, theirs in zip(native_tokens, layer_tokens, native_logits, layer_logits):
        tolerance = 0.03 * float(theirs.abs().max())
        same = next((i for i, (a, b) in enumerate(zip(ours_tokens, theirs_tokens)) if a != b), len(ours_tokens))
        steps = min(same + 1, len(ours_tokens))  # the step where they part still saw the same prefix
        torch.testing.assert_close(ours[:steps], theirs[:steps], rtol=0, atol=tolerance)
        if same < len(ours_tokens):
            best = theirs[same].topk(2).values  # [2]
            assert float(best[0] - best[1]) < 2 * tolerance, "tokens parted where the logits were not a near-tie"
        compared += steps
    assert compared >= len(native_tokens) * len(native_tokens[0]) // 2  # most steps compared


def test_fitted_blocks_keep_4_bit_blocks_and_never_do_worse_than_the_range():
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(24, 128, generator=generator) * torch.logspace(-2, 0, 24)[:, None]  # [24, 128]
    importance = torch.rand(128, generator=generator) ** 4 * 10  # [128], a few inputs run large
    on_grid = dequantize_blocks(*quantize_blocks(weight), torch.float32)  # [24, 128], a Q4_1 teacher
    _, range_scale, range_min = quantize_blocks(on_grid)
    scale, minimum = fit_blocks(on_grid.view(24, 4, BLOCK), importance.view(4, BLOCK))  # [24, 4] each
    assert torch.equal(scale, range_scale.float()) and torch.equal(minimum, range_min.float())

    def error(scale, minimum) -> torch.Tensor:  # [24], importance-weighted squared error per row
        blocks = weight.view(24, 4, BLOCK)
        levels = ((blocks - minimum[..., None]) / scale[..., None]).round().clamp(0, 15)  # [24, 4, 32]
        back = (levels * scale[..., None] + minimum[..., None]).view(24, 128)
        return (importance * (back - weight) ** 2).sum(dim=1)

    _, range_scale, range_min = quantize_blocks(weight)
    fitted = error(*fit_blocks(weight.view(24, 4, BLOCK), importance.view(4, BLOCK)))
    ranged = error(range_scale.float(), range_min.float())
    assert bool((fitted <= ranged * (1 + 1e-3)).all()) and float(fitted.sum()) < 0.9 * float(ranged.sum())


def test_the_students_matrices_are_fitted_to_its_calibration_activations(llama_pair, monkeypatch, caplog):
    windows = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))  # [2, 16]
    monkeypatch.setattr(calibration, "calibration_windows", lambda tokenizer: windows)
    fitted, seen = load_family(*llama_pair, device="cpu", weights="q4"), {}
    monkeypatch.setattr(calibration, "calibration_windows", lambda tokenizer: None)
    with caplog.at_level(logging.WARNING):
        ranged = load_family(*llama_pair, device="cpu", weights="q4")
    assert any("no calibration text" in r.getMessage() for r in caplog.records)
    for name, model in (("teacher", fitted.teacher), ("student", fitted.student)):
        other = dict((ranged.teacher if name == "teacher" else ranged.student).named_modules())
        for module_name, module in model.named_modules():
            if type(module) is Q4Linear:
                seen.setdefault(name, []).append(torch.equal(module.weight_scale, other[module_name].weight_scale))
    assert all(seen["teacher"]) and not any(seen["student"])  # the teacher's blocks are its own; the student's fitted


def test_every_size_matches_the_dequantized_pair_and_the_kernel_stays_near_it(tiny_pair, monkeypatch):
    """Off the kernel the 4-bit pair computes with exactly its dequantized weights; on it, the input's 8-bit
    blocks add an error of about a percent of the logits' scale. (Range-rounded blocks: no calibration.)"""
    monkeypatch.setattr(calibration, "calibration_windows", lambda tokenizer: None)
    reference = load_family(*tiny_pair, device="cpu", native_kernels=False)
    with torch.no_grad():
        for model in (reference.teacher, reference.student):
            for name, module in model.named_modules():
                wider = model is reference.student and name.endswith(calibration.STUDENT_INT8_MATRICES)
                if type(module) is nn.Embedding or wider:  # embeddings (and a tied head) take int8 rows
                    module.weight.copy_(dequantize_rows(*quantize_rows(module.weight), torch.float32))
                elif type(module) is nn.Linear and module.weight.data_ptr() not in _embeddings(model):
                    module.weight.copy_(dequantize_blocks(*quantize_blocks(module.weight), torch.float32))
    exact = load_family(*tiny_pair, device="cpu", weights="q4", native_kernels=False)
    kernel = load_family(*tiny_pair, device="cpu", weights="q4")
    for n in exact.sizes:
        want = forward_logits(reference.variant(n), PROMPT)
        torch.testing.assert_close(forward_logits(exact.variant(n), PROMPT), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(
            forward_logits(kernel.variant(n), PROMPT), want, rtol=0, atol=0.05 * float(want.abs().max())
        )


def _embeddings(model: nn.Module) -> set[int]:
    return {m.weight.data_ptr() for m in model.modules() if type(m) is nn.Embedding}


def test_without_the_kernel_q4_serves_through_torch_and_says_what_it_costs(llama_pair, monkeypatch, caplog):
    monkeypatch.setattr(q4_module, "load_gemv_q4", lambda: None)
    with caplog.at_level(logging.WARNING):
        family = load_family(*llama_pair, device="cpu", weights="q4")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "kernel" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("q4 weights without their native kernel")
    assert "slower than --weights float" in warnings[0]
    assert not any(m.use_kernel for m in family.teacher.modules() if type(m) is Q4Linear)
