"""Kernel builds: the vector set chosen per CPU, and each set's build against torch where this CPU runs it."""

import pytest
import torch
from torch import nn

from services.cpu.kernels import build as kernel_build
from services.cpu.kernels.gemv import SOURCE as GEMV_SOURCE


@pytest.mark.parametrize(("flags", "isa"), [({"avx2", "fma", "avx512f"}, "avx512"), ({"avx2", "fma"}, "avx2"),
                                            ({"avx512f"}, None), ({"sse4_2"}, None)])
def test_the_widest_vector_set_the_cpu_has(monkeypatch, flags, isa):
    monkeypatch.setattr(kernel_build, "cpu_flags", lambda: flags)
    assert kernel_build.best_isa() == isa


def test_builds_for_different_vector_sets_never_share_a_cache_entry():
    names = {kernel_build.versioned_name("k", GEMV_SOURCE, isa) for isa in kernel_build.ISAS}
    assert len(names) == len(kernel_build.ISAS)


@pytest.mark.parametrize("isa", list(kernel_build.ISAS))
def test_each_vector_set_matches_torch_where_this_cpu_runs_it(isa):
    if not kernel_build.ISAS[isa][0] <= kernel_build.cpu_flags():
        pytest.skip(f"no {isa} here")
    gemv = kernel_build.build("boomerang_gemv", GEMV_SOURCE, isa).gemv
    generator = torch.Generator().manual_seed(7)
    for rows, out_features, in_features in [(1, 576, 576), (8, 1536, 576), (16, 9, 1537), (3, 13, 7), (5, 40, 24)]:
        x = torch.randn(rows, in_features, generator=generator)  # [rows, in]
        weight = torch.randn(out_features, in_features, generator=generator)  # [out, in]
        torch.testing.assert_close(gemv(x, weight, None), nn.functional.linear(x, weight), rtol=1e-5, atol=1e-4)
