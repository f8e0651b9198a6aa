"""The few-row fp32 GEMV kernel (`gemv.cpp`) and its read loop as a bandwidth probe: built once per machine,
`None` where it cannot be."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from services.cpu.kernels.build import build

SOURCE = Path(__file__).with_name("gemv.cpp")


@functools.cache
def _module():
    return build("boomerang_gemv", SOURCE)


def load_gemv() -> Callable | None:
    """`gemv(x [rows, in], weight [out, in], bias | None) -> [rows, out]`, or None (no compiler, no AVX2)."""
    return None if _module() is None else _module().gemv


def load_gemv_q8() -> Callable | None:
    """`gemv_q8(x [rows, in], weight int8 [out, in], scale [out], bias | None) -> [rows, out]`, or None."""
    return None if _module() is None else _module().gemv_q8


def load_gemv_q4() -> Callable | None:
    """`gemv_q4(x [rows, in], weight uint8 [out, in / 2], scale fp16 [out, in / 32], minimum fp16 [out, in / 32],
    bias | None) -> [rows, out]` (4-bit blocks, `services/family/q4.py`), or None."""
    return None if _module() is None else _module().gemv_q4


def load_stream_sum() -> Callable | None:
    """`stream_sum(data) -> float`: the sum of a contiguous fp32 tensor read like GEMV weights, or None."""
    return None if _module() is None else _module().stream_sum
