"""The native GEMV kernel against torch's matmul, and the in-place `FastLinear` swap that uses it."""

import pytest
import torch
from torch import nn

from services.cpu.fast_linear import MAX_ROWS, FastLinear, disable_fast_linear, enable_fast_linear
from services.cpu.kernels.gemv import load_gemv
from services.family import load_family

pytestmark = pytest.mark.skipif(load_gemv() is None, reason="no C++ compiler or no AVX2/FMA here")


@pytest.mark.parametrize(("rows", "out_features", "in_features"), [(1, 576, 576), (3, 13, 7), (8, 1536, 576),
                                                                   (16, 9, 1537), (1, 49152, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_torch_linear(rows, out_features, in_features, bias):
    generator = torch.Generator().manual_seed(rows * out_features + in_features)
    x = torch.randn(rows, in_features, generator=generator)  # [rows, in]
    weight = torch.randn(out_features, in_features, generator=generator)  # [out, in]
    b = torch.randn(out_features, generator=generator) if bias else None
    torch.testing.assert_close(load_gemv()(x, weight, b), nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-4)


def test_swap_keeps_the_parameters_and_dispatches_by_shape_and_grad():
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8, bias=False))
    pointers = [p.data_ptr() for p in model.parameters()]
    assert enable_fast_linear(model) == 2 and type(model[0]) is FastLinear
    assert [p.data_ptr() for p in model.parameters()] == pointers  # nothing copied
    layer = model[0]
    few, many = torch.randn(2, 3, 32), torch.randn(MAX_ROWS + 1, 32)  # 6 rows: kernel; 17 rows: torch
    torch.testing.assert_close(layer(few), nn.functional.linear(few, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    assert torch.equal(layer(many), nn.functional.linear(many, layer.weight, layer.bias))
    model(torch.randn(1, 32)).sum().backward()  # training: autograd through torch's path
    assert model[0].weight.grad is not None
    disable_fast_linear(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear


def test_family_uses_it_unless_switched_off_and_greedy_tokens_do_not_change(llama_pair, monkeypatch):
    prompt = torch.tensor([[1, 5, 9, 14, 2, 7]])
    family = load_family(*llama_pair, device="cpu")
    assert any(isinstance(m, FastLinear) for m in family.teacher.modules())
    with torch.inference_mode():
        fast = [family.variant(n).generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
                for n in family.sizes]
    monkeypatch.setenv("BOOMERANG_NATIVE_KERNELS", "0")
    stock_family = load_family(*llama_pair, device="cpu")
    assert not any(isinstance(m, FastLinear) for m in stock_family.teacher.modules())
    with torch.inference_mode():
        stock = [stock_family.variant(n).generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
                 for n in stock_family.sizes]
    assert [t.tolist() for t in fast] == [t.tolist() for t in stock]
