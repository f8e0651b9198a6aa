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
        if not self._is_view_of_buffer(length):
            self._key_buffer = self._value_buffer = None  # a fresh start, or keys replaced by crop/reorder
        needed = length + key_states.shape[-2]
        if self._key_buffer is None or needed > self._key_buffer.shape[-2]:
            self._grow(key_states, value_states, length, needed)
        self._key_buffer[..., length:needed, :] = key_states
        self._value_buffer[..., length:needed, :] = value_states
        self.keys = self._key_buffer[..., :needed, :]  # [batch, kv_heads, needed, head_dim]
        self.values = self._value_buffer[..., :needed, :]
        return self.keys, self.values

    def _is_view_of_buffer(self, length: int) -> bool:
        buffer = getattr(self, "_key_buffer", None)
        return buffer is not None and (length == 0 or self.keys.data_ptr() == buffer.data_ptr())

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, needed: int) -> None:
        old = getattr(self, "_key_buffer", None)
        capacity = max(needed, MIN_CAPACITY, 2 * (old.shape[-2] if old is not None else 0))
        shape = (*key_states.shape[:-2], capacity, key_states.shape[-1])
        keys = key_states.new_empty(shape)
        values = value_states.new_empty((*shape[:-1], value_states.shape[-1]))
        if length:
            keys[..., :length, :] = self.keys
            values[..., :length, :] = self.values
        self._key_buffer, self._value_buffer = keys, values
