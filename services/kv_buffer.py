"""A KV cache layer that appends in place: a buffer that doubles when full, instead of a copy per step.

`DynamicLayer` concatenates every step, copying the whole cache of every layer each token: O(n) per
step, O(n^2) per request. Here each step writes only its new positions; the buffer is reallocated
(doubling) about log2(n) times. `keys`/`values` stay views of the filled part, so everything that
reads a `DynamicLayer` (masks, sequence length, crop, reorder) still works; after such a method
replaces them, the next update starts a new buffer from them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

MIN_CAPACITY = 64  # positions allocated at first: a short request never reallocates


class GrowingLayer(DynamicLayer):
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
        length = self.keys.shape[-2]
        self._make_room(self.keys, self.values, length, length + new)
        return self._key_buffer, self._value_buffer, length

    def advance(self, length: int) -> None:
        """Positions [0, length) of the buffers are filled: `keys`/`values` become views of them."""
        self.keys = self._key_buffer[..., :length, :]  # [batch, kv_heads, length, head_dim]
        self.values = self._value_buffer[..., :length, :]

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
