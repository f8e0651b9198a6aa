"""Build the real engine from plain options (the HTTP layer's settings, unpacked)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from services.cpu.threads import serving_threads
from services.engine.engine import InferenceEngine
from services.engine.interface import EngineLimits
from services.family import load_family

log = logging.getLogger(__name__)


def apply_serving_threads(threads: int | None) -> int:
    """Size torch's thread pool once, before the weights load (the setting, else the container's CPU quota)."""
    count, source = serving_threads(threads)
    torch.set_num_threads(count)
    log.info("torch threads: %d (from %s)", count, source)
    return count


def build_engine(
    *,
    pair: str | None = None,
    teacher: str | None = None,
    student: str | None = None,
    order: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    name: str | None = None,
    variant_cache_size: int = 32,
    native_kernels: bool | None = None,
    limits: EngineLimits = EngineLimits(),
    on_batch: Callable[[int | str, int], None] | None = None,
    threads: int | None = None,
    weights: str = "float",
) -> InferenceEngine:
    apply_serving_threads(threads)
    family = load_family(
        teacher,
        student,
        pair=pair,
        order=order,
        dtype=dtype,
        device=device,
        cache_size=variant_cache_size,
        name=name,
        native_kernels=native_kernels,
        weights=weights,
    )
    return InferenceEngine(family, limits, on_batch)
