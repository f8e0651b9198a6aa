"""A per-request KV cache for variants whose layer modules are shared with other variants.

Every distinct layer module owns a fixed, unique `layer_idx` (teacher layers 0..N-1, student layers
N..N+S-1), set once when the family loads. A variant's cache maps those global slots to its own
positions 0..n-1, so two variants sharing a module can run at the same time with separate caches and
nobody rewrites `layer_idx` per request.
"""

from __future__ import annotations

from collections.abc import Mapping

from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from services.family.kv_buffer import GrowingLayer


class SlotCache(DynamicCache):
    """`DynamicCache` laid out like the variant, addressed by the modules' global slots."""

    def __init__(self, config, slot_to_position: Mapping[int, int]):
        super().__init__(config=config)
        self.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in self.layers]
        self.slot_to_position = dict(slot_to_position)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        position = self.slot_to_position[layer_idx]
        return super().update(key_states, value_states, position, *args, **kwargs)
