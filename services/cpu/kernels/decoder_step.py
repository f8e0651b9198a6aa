"""The native decode step of decoder layers (`decoder_step.cpp`): built once per machine, `None` where it cannot be."""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

from services.cpu.kernels.build import build

SOURCE = Path(__file__).with_name("decoder_step.cpp")


@functools.cache
def load_decoder_step() -> ModuleType | None:
    """The module with `LayerStack`, or None (no compiler, no AVX2/FMA)."""
    return build("boomerang_decoder_step", SOURCE)
