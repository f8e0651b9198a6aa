"""A KV cache layer that appends in place: a buffer that doubles when full, instead of a copy per step.

`DynamicLayer` concatenates every step, copying the whole cache of every layer each token: O(n) per
step, O(n^2) per request. Here each step writes only its new positions; the buffer is reallocated
(doubling) about log2(n) times. `keys`/`values` stay views of the filled part, so everything that
reads a `DynamicLayer` (masks, sequence length, crop, reorder) still works; after such a method
replaces them, the next update starts a new buffer from them. A native writer that appends every step
(`reserve`, then `advance`) only records the filled length: the views are made when next read.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 64  # positions allocated at first: a short request never reallocates


class _View:
    """`keys` or `values` of a `GrowingLayer`: a view of the filled part of its buffer, made when read after
    an `advance` (and before any assignment, so the other one stays consistent)."""

    def __set_name__(self, owner, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, layer, owner=None):
        if layer is None:
            return self
        if layer._filled is not None:
            layer._make_views()
        return getattr(layer, self.slot)

    def __set__(self, layer, value: torch.Tensor | None) -> None:
        layer._make_views()
        setattr(layer, self.slot, value)


class GrowingLayer(DynamicLayer):
    keys = _View()
    values = _View()

    def _make_views(self) -> None:
        """Turns a recorded `advance` into the views (a no-op when there is none pending)."""
        filled, self._filled = getattr(self, "_filled", None), None
        if filled is not None:
            self._keys = self._key_buffer[..., :filled, :]  # [batch, kv_heads, filled, head_dim]
            self._values = self._value_buffer[..., :filled, :]

    def filled(self) -> int:
        """Positions held (0 before the first update), without making views."""
        if self._filled is not None:
            return self._filled
        return self._keys.shape[-2] if self.is_initialized and self._keys.numel() else 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states: [batch, kv_heads, new, head_dim]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.numel() else 0
        needed = length + key_states.shape[-2]
        self._make_room(key_states, value_states, length, needed)
        self._key_buffer[..., length:needed, :] = key_states
        self._value_buffer[..., length:needed, :] = value_states
        self.advance(needed)
        return self.keys, self.values

    def reserve(self, new: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """For a writer that fills positions itself: (key buffer, value buffer, filled length), with room for
        `new` more positions; buffers are [batch, kv_heads, capacity, head_dim]. Call `advance` after writing."""
        length = self._filled
        if length is not None and length + new <= self._key_buffer.shape[-2]:
            return self._key_buffer, self._value_buffer, length  # the common case: room, views not yet made
        length = self.keys.shape[-2]
        self._make_room(self.keys, self.values, length, length + new)
        return self._key_buffer, self._value_buffer, length

    def advance(self, length: int) -> None:
        """Positions [0, length) of the buffers are filled: `keys`/`values` become views of them (when read)."""
        self._filled = length

    def _make_room(self, keys: torch.Tensor, values: torch.Tensor, length: int, needed: int) -> None:
        if not self._is_view_of_buffer(length):
            self._key_buffer = self._value_buffer = None  # a fresh start, or keys replaced by crop/reorder
        if self._key_buffer is None or needed > self._key_buffer.shape[-2]:
            self._grow(keys, values, length, needed)

    def _is_view_of_buffer(self, length: int) -> bool:
        buffer = getattr(self, "_key_buffer", None)
        return buffer is not None and (length == 0 or self.keys.data_ptr() == buffer.data_ptr())

    def _grow(self, keys_like: torch.Tensor, values_like: torch.Tensor, length: int, needed: int) -> None:
        old = getattr(self, "_key_buffer", None)
        capacity = max(needed, MIN_CAPACITY, 2 * (old.shape[-2] if old is not None else 0))
        shape = (*keys_like.shape[:-2], capacity, keys_like.shape[-1])
        keys = keys_like.new_empty(shape)
        values = values_like.new_empty((*shape[:-1], values_like.shape[-1]))
        if length:
            keys[..., :length, :] = self.keys
            values[..., :length, :] = self.values
        self._key_buffer, self._value_buffer = keys, values
