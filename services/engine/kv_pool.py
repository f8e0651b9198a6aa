"""KV buffers reserved once and reused across batches, instead of allocated per batch and per join.

A batch takes its buffers from the pool and gives them back when it ends, joins another or outgrows them;
the next batch reuses them. Blocks stay reserved while the pool holds at most `budget_bytes`; past that, free
blocks go back to the allocator before a new one is made, so what is reserved follows the limits, not the
traffic. The counters feed `/metrics`.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Iterable

import torch


class KVPool:
    def __init__(self, dtype: torch.dtype, budget_bytes: int | None = None, device: str | torch.device = "cpu"):
        self.dtype, self.device, self.budget_bytes = dtype, torch.device(device), budget_bytes
        self.item_bytes = torch.empty((), dtype=dtype).element_size()
        self._free: list[tuple[int, int, torch.Tensor]] = []  # (numel, id, block), ascending numel
        self._in_use: dict[int, torch.Tensor] = {}  # data_ptr of a handed-out view -> its block
        self._reserved = 0  # elements in all blocks
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised buffer of `shape`: a view of the smallest free block that holds it, or a new block."""
        numel = math.prod(shape)
        with self._lock:
            at = bisect.bisect_left(self._free, (numel, -1))
            if at < len(self._free):
                block = self._free.pop(at)[2]
            else:
                self._make_room_for(numel)
                block = torch.empty(numel, dtype=self.dtype, device=self.device)
                self._reserved += numel
            view = block[:numel].view(shape)
            self._in_use[view.data_ptr()] = block
            return view

    def give(self, buffers: Iterable[torch.Tensor]) -> None:
        """Hands buffers from `take` back; they stay reserved for the next `take`."""
        with self._lock:
            for buffer in buffers:
                block = self._in_use.pop(buffer.data_ptr())
                bisect.insort(self._free, (block.numel(), id(block), block))

    def _make_room_for(self, numel: int) -> None:
        """Frees the largest free blocks until a new block of `numel` fits the budget (or none is left)."""
        if self.budget_bytes is None:
            return
        while self._free and (self._reserved + numel) * self.item_bytes > self.budget_bytes:
            block = self._free.pop()[2]
            self._reserved -= block.numel()

    @property
    def reserved_bytes(self) -> int:
        return self._reserved * self.item_bytes

    @property
    def in_use_bytes(self) -> int:
        with self._lock:
            return sum(block.numel() for block in self._in_use.values()) * self.item_bytes
