"""KV buffers reserved once and reused across batches, instead of allocated per batch and per join.

A batch takes its buffers from the pool and gives them back when it ends, joins another or outgrows them;
the next batch reuses them. Blocks stay reserved while the pool holds at most `budget_bytes`; past that, free
blocks go back to the allocator before a new one is made, so what is reserved follows the limits, not the
traffic. A free block nobody took for `idle_s` goes back too (`release_idle`): what the pool keeps follows the
recent traffic, not the largest batch it ever saw. The counters feed `/metrics`.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Iterable

import torch


class KVPool:
    def __init__(self, dtype: torch.dtype, budget_bytes: int | None = None, device: str | torch.device = "cpu",
                 idle_s: float = 60.0):
        self.dtype, self.device, self.budget_bytes, self.idle_s = dtype, torch.device(device), budget_bytes, idle_s
        self._given_at: dict[int, float] = {}  # id of a free block -> when it was given back
        self.item_bytes = torch.empty((), dtype=dtype).element_size()
        self._free: list[tuple[int, int, torch.Tensor]] = []  # (numel, id, block), ascending numel
        self._in_use: dict[int, torch.Tensor] = {}  # data_ptr of a handed-out view -> its block
        self._reserved = 0  # elements in all blocks
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """An uninitialised buffer of `shape`: a view of the smallest free block that holds it without wasting
        more than its size, or a new block."""
        numel = math.prod(shape)
        with self._lock:
            at = bisect.bisect_left(self._free, (numel, -1))
            if at < len(self._free) and self._free[at][0] <= 2 * numel:
                block = self._free.pop(at)[2]
                del self._given_at[id(block)]
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
                self._given_at[id(block)] = time.monotonic()

    def _make_room_for(self, numel: int) -> None:
        """Frees the largest free blocks until a new block of `numel` fits the budget (or none is left)."""
        if self.budget_bytes is None:
            return
        while self._free and (self._reserved + numel) * self.item_bytes > self.budget_bytes:
            self._drop(self._free.pop()[2])

    def release_idle(self, now: float | None = None) -> int:
        """Hands free blocks nobody took for `idle_s` back to the allocator; returns the bytes released."""
        now = time.monotonic() if now is None else now
        with self._lock:
            idle = [entry for entry in self._free if now - self._given_at[entry[1]] >= self.idle_s]
            if not idle:
                return 0
            self._free = [entry for entry in self._free if now - self._given_at[entry[1]] < self.idle_s]
            for _, _, block in idle:
                self._drop(block)
            return sum(block.numel() for _, _, block in idle) * self.item_bytes

    def _drop(self, block: torch.Tensor) -> None:
        self._reserved -= block.numel()
        self._given_at.pop(id(block), None)

    @property
    def reserved_bytes(self) -> int:
        return self._reserved * self.item_bytes

    @property
    def in_use_bytes(self) -> int:
        with self._lock:
            return sum(block.numel() for block in self._in_use.values()) * self.item_bytes
