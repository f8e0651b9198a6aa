"""GPTQ's column loop in C++ (`gptq_loop.cpp`): built once per machine, `None` where it cannot be."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

from services.cpu.kernels.build import build

SOURCE = Path(__file__).with_name("gptq_loop.cpp")


@functools.cache
def _module():
    return build("boomerang_gptq_loop", SOURCE)


def load_round_columns() -> Callable | None:
    """`round_columns(columns, factor, start, stop, update_end, scale, minimum, inverse, low, high, levels,
    errors)` as `services.family.gptq.round_columns` computes it, or None (no compiler, no AVX2)."""
    return None if _module() is None else _module().round_columns


def load_round_blocks() -> Callable | None:
    """`round_blocks(columns, factor, importance, steps, start, end, scale, minimum, levels, errors)` as
    `services.family.gptq.gptq_blocks` rounds a group of whole 4-bit blocks, or None."""
    return None if _module() is None else _module().round_blocks
