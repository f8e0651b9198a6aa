"""Model weights on 2 MiB pages (Linux transparent huge pages) for CPU decode.

Decode reads every weight once per token, 4 KiB page after 4 KiB page. On 4 KiB pages every page of a
few hundred MB of weights needs its own TLB entry, and the page-table walks fall out of the caches the
weights stream through (measured in docs/performance.md).

`move_to_huge_pages` copies the distinct parameter tensors of some models into one anonymous mapping
advised for huge pages (madvise before first touch, so the kernel backs it with 2 MiB pages as it is
filled) and points the parameters at their copies: tensors shared between models (a tied or shared
embedding) stay shared, and one mapping wastes at most one page. Where the kernel cannot, each distinct
tensor is still copied once into ordinary memory of its own: weights read from safetensors may sit in
file-backed pages, which decode reads more slowly. Either way the loaded weights are copied once.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import mmap
from pathlib import Path

import torch
from torch import nn

from services.cpu.heap import libc, trim_heap

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h
ALIGN = 64  # bytes: each tensor starts on a cache line
MIN_BYTES = 64 << 10  # smaller tensors (norms, biases, scales) stay where they are; int8 matrices do not
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Whether this kernel can back an advised mapping with huge pages (`enabled` is always or madvise)."""
    try:
        return "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def _advised_mapping(nbytes: int) -> tuple[mmap.mmap, int] | None:
    """An anonymous mapping with `nbytes` from its first 2 MiB boundary on, advised for huge pages, and that
    boundary's offset; None where madvise refuses."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(mapping))
    start = -address % HUGE_PAGE
    if libc().madvise(address + start, nbytes, MADV_HUGEPAGE) != 0:
        mapping.close()
        return None
    return mapping, start


def _distinct_parameters(models: list[nn.Module], min_bytes: int) -> dict[int, list[nn.Parameter]]:
    """CPU parameters of at least `min_bytes`, grouped by the memory they hold (shared ones once)."""
    groups: dict[int, list[nn.Parameter]] = {}
    for model in models:
        for param in model.parameters():
            if param.device.type == "cpu" and param.is_contiguous() and param.nbytes >= min_bytes:
                groups.setdefault(param.data_ptr(), []).append(param)
    return groups


def move_to_huge_pages(models: list[nn.Module], min_bytes: int = MIN_BYTES) -> int:
    """Moves the parameters of `models` onto 2 MiB pages (see the module); returns the bytes moved, 0 where
    the kernel has no transparent huge pages or the mapping cannot be advised (then into plain memory).
    Tensors under `min_bytes` get plain memory of their own: one left on the loaded file's pages would keep
    the whole file's mapping, and every page of it that was read, resident."""
    groups = _distinct_parameters(models, min_bytes)
    small = {pointer: params for pointer, params in _distinct_parameters(models, 0).items() if pointer not in groups}
    sizes = [-(-params[0].nbytes // ALIGN) * ALIGN for params in groups.values()]
    advised = _advised_mapping(sum(sizes)) if groups and huge_pages_available() else None
    _copy_to_own_memory(small if advised is not None else {**groups, **small})
    if advised is None:
        _release_freed_memory()
        return 0
    mapping, offset = advised
    for params, size in zip(groups.values(), sizes):
        source = params[0].detach()
        # the tensor keeps the mapping alive (frombuffer holds a reference to it)
        target = torch.frombuffer(mapping, dtype=torch.uint8, count=source.nbytes, offset=offset)
        target = target.view(source.dtype).view(source.shape)
        target.copy_(source)
        for param in params:
            param.data = target
        offset += size
    _release_freed_memory()
    log.info("weights on 2 MiB pages: %.0f MiB in %d tensors", sum(sizes) / 2**20, len(groups))
    return sum(sizes)


def _copy_to_own_memory(groups: dict[int, list[nn.Parameter]]) -> None:
    for params in groups.values():
        target = params[0].detach().clone()
        for param in params:
            param.data = target


def _release_freed_memory() -> None:
    """Hands the heap memory the old copies held back to the system (glibc keeps freed blocks that are
    not at the top of its heap, and the loaded weights were)."""
    gc.collect()  # the old tensors may still sit in reference cycles (the loader's)
    trim_heap()
