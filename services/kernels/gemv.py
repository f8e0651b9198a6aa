"""The few-row fp32 GEMV kernel (`gemv.cpp`): built once per machine, `None` where it cannot be."""

from __future__ import annotations

import functools
import logging
import platform
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("gemv.cpp")


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx2" in flags and " fma" in flags


@functools.cache
def load_gemv() -> Callable | None:
    """`gemv(x [rows, in], weight [out, in], bias | None) -> [rows, out]`, or None (no compiler, no AVX2)."""
    if platform.machine() not in ("x86_64", "AMD64") or not _cpu_has_avx2_fma():
        return None
    try:
        from torch.utils.cpp_extension import load

        module = load("boomerang_gemv", [str(SOURCE)], extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
                      extra_ldflags=["-fopenmp"], verbose=False)  # at::parallel_for is OpenMP, in the header
    except Exception as error:  # no compiler, no headers: the stock path serves instead
        log.warning("native GEMV kernel unavailable, using torch's matmul: %s", str(error).splitlines()[0])
        return None
    return module.gemv
