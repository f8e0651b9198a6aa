"""The few-row fp32 GEMV kernel (`gemv.cpp`): built once per machine, `None` where it cannot be."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from services.kernels.build import build

SOURCE = Path(__file__).with_name("gemv.cpp")


@functools.cache
def load_gemv() -> Callable | None:
    """`gemv(x [rows, in], weight [out, in], bias | None) -> [rows, out]`, or None (no compiler, no AVX2)."""
    module = build("boomerang_gemv", SOURCE)
    return None if module is None else module.gemv
