"""Kernel builds: the vector set chosen per CPU, each set's build against torch where this CPU runs it, and builds
made ahead of time (the image's) found with no compiler."""

import logging
import os
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils import cpp_extension

from services.cpu.kernels import build as kernel_build
from services.cpu.kernels.build import prebuilt
from services.cpu.kernels.gemv import SOURCE as GEMV_SOURCE
from services.cpu.kernels.gemv import _module as gemv_module


@pytest.mark.parametrize(("flags", "isa"), [
    ({"avx2", "fma", "f16c", "avx512f", "avx512vl", "avx512_vnni"}, "avx512_vnni"),
    ({"avx2", "fma", "f16c", "avx512f"}, "avx512"), ({"avx2", "fma", "f16c"}, "avx2"), ({"avx2", "fma"}, None),
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


@pytest.fixture(scope="module")
def prebuilt_avx2(request, tmp_path_factory) -> Path:
    """The GEMV kernel built ahead of time for AVX2, kept in pytest's cache between runs: its name changes
    whenever its sources or flags do."""
    if not kernel_build.ISAS["avx2"][0] <= kernel_build.cpu_flags():
        pytest.skip("no AVX2 here")
    cache = request.config.cache
    directory = cache.mkdir("prebuilt-kernels") if cache is not None else tmp_path_factory.mktemp("kernels")
    kernel_build.build_ahead(directory, [GEMV_SOURCE], ["avx2"])
    return directory


def _no_compiler(*args, **kwargs):
    raise RuntimeError("Ninja is required to load C++ extensions")


def test_a_kernel_built_ahead_is_imported_from_the_extensions_dir_with_no_compiler(prebuilt_avx2, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(prebuilt_avx2))
    monkeypatch.setattr(cpp_extension, "load", _no_compiler)
    monkeypatch.setattr(kernel_build, "cpu_flags", lambda: {"avx2", "fma", "f16c"})  # an AVX2-only CPU picks this build
    found = []
    monkeypatch.setattr(kernel_build, "prebuilt", lambda name: found.append(prebuilt(name)) or found[-1])
    module = gemv_module.__wrapped__()  # the name the serving path asks for, past its per-process cache
    # a module of the same name built earlier in this process may be what Python hands back; the lookup is the test
    assert module is not None and found == [module]
    assert kernel_build._built(module.__name__, prebuilt_avx2) is not None
    x, weight = torch.randn(3, 100), torch.randn(50, 100)  # [rows, in], [out, in]
    torch.testing.assert_close(module.gemv(x, weight, None), nn.functional.linear(x, weight), rtol=1e-5, atol=1e-4)


def test_with_neither_a_prebuilt_kernel_nor_a_compiler_torch_serves_with_a_warning(tmp_path, monkeypatch, caplog):
    if not kernel_build.ISAS["avx2"][0] <= kernel_build.cpu_flags():
        pytest.skip("no AVX2 here")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "load", _no_compiler)
    with caplog.at_level(logging.WARNING, logger=kernel_build.__name__):
        assert kernel_build.build("boomerang_gemv", GEMV_SOURCE, "avx2") is None
    assert "unavailable, using torch" in caplog.text


def test_the_image_command_leaves_an_empty_directory_where_there_is_nothing_to_build(tmp_path, monkeypatch):
    """The image copies the directory on every platform, so it must exist on ARM too."""
    monkeypatch.setattr(kernel_build.platform, "machine", lambda: "aarch64")
    kernel_build.main([str(tmp_path / "kernels")])
    assert list((tmp_path / "kernels").iterdir()) == []


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path):
    from services.cpu.kernels.build import STALE_LOCK_S, clear_stale_lock

    lock = tmp_path / "boomerang_k" / "lock"
    lock.parent.mkdir()
    lock.touch()
    assert not clear_stale_lock("boomerang_k", tmp_path) and lock.exists()  # a build may be running
    old = lock.stat().st_mtime - STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    assert clear_stale_lock("boomerang_k", tmp_path) and not lock.exists()
    assert not clear_stale_lock("boomerang_k", tmp_path)  # nothing left to remove


def test_a_kernel_built_on_this_machine_is_imported_past_a_lock_a_killed_start_left(monkeypatch):
    if not kernel_build.ISAS["avx2"][0] <= kernel_build.cpu_flags():
        pytest.skip("no AVX2 here")
    assert kernel_build.build("boomerang_gemv", GEMV_SOURCE, "avx2") is not None  # built (or found) once
    name = kernel_build.versioned_name("boomerang_gemv", GEMV_SOURCE, "avx2")
    lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
    monkeypatch.setattr(cpp_extension, "load", _no_compiler)  # torch's load would wait on the lock
    lock.touch()
    try:
        module = kernel_build.build("boomerang_gemv", GEMV_SOURCE, "avx2")
    finally:
        lock.unlink()
    assert module is not None
    x, weight = torch.randn(2, 64), torch.randn(8, 64)  # [rows, in], [out, in]
    torch.testing.assert_close(module.gemv(x, weight, None), nn.functional.linear(x, weight), rtol=1e-5, atol=1e-4)
