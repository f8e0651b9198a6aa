"""int8 weights: the quantizer, the int8 GEMV kernel against torch, and an int8 family against the same pair
with its weights replaced by their dequantized values (the int8 form's own reference)."""

import pytest
import torch
from torch import nn

from services.cpu.kernels.gemv import load_gemv_q8
from services.family import calibration, load_family
from services.family.int8 import Int8Embedding, Int8Linear
from services.family.int8_rows import dequantize_rows, quantize_rows
from tests.services.engine.reference import forward_logits

PROMPT = [5, 17, 42, 99, 7, 3, 250, 61]


def test_rows_round_to_within_half_a_step_of_their_own_scale():
    weight = torch.randn(13, 70) * torch.logspace(-3, 1, 13)[:, None]  # [13, 70], rows of very different size
    weight[4] = 0  # an all-zero row keeps a usable scale
    q, scale = quantize_rows(weight)
    assert q.dtype == torch.int8 and scale.shape == (13,) and int(q.abs().max()) == 127
    error = (dequantize_rows(q, scale, torch.float32) - weight).abs()  # [13, 70]
    assert bool((error <= scale[:, None] / 2 + 1e-7).all())
    assert torch.equal(dequantize_rows(q, scale, torch.float32)[4], torch.zeros(70))


@pytest.mark.skipif(load_gemv_q8() is None, reason="no C++ compiler or no AVX2/FMA here")
@pytest.mark.parametrize(
    ("rows", "out_features", "in_features"),
    [(1, 576, 576), (3, 13, 7), (8, 1536, 576), (16, 9, 1537), (5, 17, 130), (1, 4099, 64)],
)
@pytest.mark.parametrize("bias", [True, False])
def test_int8_kernel_matches_torch_on_the_dequantized_weights(rows, out_features, in_features, bias):
    generator = torch.Generator().manual_seed(rows * out_features + in_features)
    x = torch.randn(rows, in_features, generator=generator)  # [rows, in]
    q, scale = quantize_rows(torch.randn(out_features, in_features, generator=generator))
    b = torch.randn(out_features, generator=generator) if bias else None
    want = nn.functional.linear(x, dequantize_rows(q, scale, torch.float32), b)  # [rows, out]
    torch.testing.assert_close(load_gemv_q8()(x, q, scale, b), want, rtol=1e-5, atol=1e-4)


def _dequantized_reference(pair) -> object:
    """The pair in fp32 with every matrix and embedding replaced by its int8 round trip."""
    family = load_family(*pair, device="cpu", native_kernels=False)
    with torch.no_grad():
        for model in (family.teacher, family.student):
            for module in model.modules():
                if isinstance(module, nn.Linear | nn.Embedding):
                    module.weight.copy_(dequantize_rows(*quantize_rows(module.weight), torch.float32))
    return family


@pytest.fixture
def rounded_to_nearest(monkeypatch):
    """No calibration text: every matrix rounded to nearest, as `_dequantized_reference` rounds it."""
    monkeypatch.setattr(calibration, "calibration_windows", lambda tokenizer: None)


@pytest.mark.parametrize("native_kernels", [False, True])
def test_every_size_matches_the_dequantized_pair(tiny_pair, native_kernels, rounded_to_nearest):
    int8 = load_family(*tiny_pair, device="cpu", weights="int8", native_kernels=native_kernels)
    reference = _dequantized_reference(tiny_pair)
    assert int8.weights == "int8" and int8.dtype == torch.float32
    for n in int8.sizes:
        torch.testing.assert_close(
            forward_logits(int8.variant(n), PROMPT), forward_logits(reference.variant(n), PROMPT), rtol=1e-4, atol=1e-4
        )


def _distinct(family, skip: str = "\0") -> dict[int, int]:
    """Bytes of each distinct tensor of the pair, parameters and buffers (names containing `skip` left out)."""
    return {
        t.data_ptr(): t.nbytes
        for model in (family.teacher, family.student)
        for name, t in (*model.named_parameters(), *model.named_buffers())
        if skip not in name and "rotary" not in name
    }


def test_shared_tensors_stay_shared_and_the_family_takes_a_quarter_of_the_bytes(llama_pair):
    full = load_family(*llama_pair, device="cpu")
    int8 = load_family(*llama_pair, device="cpu", weights="int8")
    teacher = int8.teacher
    assert type(teacher.model.embed_tokens) is Int8Embedding and type(teacher.lm_head) is Int8Linear
    assert teacher.lm_head.weight is teacher.model.embed_tokens.weight  # tied: one int8 tensor
    assert teacher.lm_head.weight_scale is teacher.model.embed_tokens.weight_scale
    assert len(_distinct(int8, skip="weight_scale")) == len(_distinct(full))  # shared: quantized once
    ratio = sum(_distinct(int8).values()) / sum(_distinct(full).values())
    assert 0.25 < ratio <= 0.30, ratio  # int8 plus one fp32 scale per row and the fp32 norms


def test_int8_in_bfloat16_keeps_the_activations_dtype_and_matches_its_reference(llama_pair, rounded_to_nearest):
    """Half-precision pairs (the GPU default) quantize too: scales stay fp32 buffers, the family still
    computes in bf16, and each size matches the same pair dequantized in bf16."""
    int8 = load_family(*llama_pair, device="cpu", dtype="bfloat16", weights="int8")
    assert int8.dtype == torch.bfloat16 and int8.teacher.lm_head.weight_scale.dtype == torch.float32
    reference = load_family(*llama_pair, device="cpu", dtype="bfloat16")
    with torch.no_grad():
        for model in (reference.teacher, reference.student):
            for module in model.modules():
                if isinstance(module, nn.Linear | nn.Embedding):
                    module.weight.copy_(dequantize_rows(*quantize_rows(module.weight), torch.bfloat16))
    for n in (int8.sizes[0], int8.sizes[-1]):
        torch.testing.assert_close(
            forward_logits(int8.variant(n), PROMPT), forward_logits(reference.variant(n), PROMPT), rtol=2e-2, atol=2e-2
        )


def test_the_students_matrices_are_fitted_to_its_calibration_activations(llama_pair, monkeypatch):
    windows = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))  # [2, 16]
    monkeypatch.setattr(calibration, "calibration_windows", lambda tokenizer: windows)
    fitted = load_family(*llama_pair, device="cpu", weights="int8")
    monkeypatch.setattr(calibration, "calibration_windows", lambda tokenizer: None)
    nearest = load_family(*llama_pair, device="cpu", weights="int8")
    student, refitted = calibration.student_matrices(fitted), 0
    for model, other in ((fitted.teacher, nearest.teacher), (fitted.student, nearest.student)):
        others = dict(other.named_modules())
        for name, module in model.named_modules():
            if type(module) is Int8Linear:  # the teacher's and any head: to nearest; the student's layers: fitted
                fits = any(m is module for m in student.values())
                assert torch.equal(module.weight_scale, others[name].weight_scale)  # each row's own range
                assert torch.equal(module.weight, others[name].weight) != fits, name
                refitted += fits
    assert refitted == len(student) > 0
