"""Build the real engine from plain options (the HTTP layer's settings, unpacked)."""

from __future__ import annotations

from collections.abc import Callable

from services.engine.engine import InferenceEngine
from services.engine.interface import EngineLimits
from services.family import load_family


def build_engine(*, pair: str | None = None, teacher: str | None = None, student: str | None = None,
                 order: str | None = None, device: str | None = None, dtype: str | None = None,
                 name: str | None = None, variant_cache_size: int = 32, native_kernels: bool | None = None,
                 limits: EngineLimits = EngineLimits(),
                 on_batch: Callable[[int | str, int], None] | None = None) -> InferenceEngine:
    family = load_family(teacher, student, pair=pair, order=order, dtype=dtype, device=device,
                         cache_size=variant_cache_size, name=name, native_kernels=native_kernels)
    return InferenceEngine(family, limits, on_batch)
