"""Small shims over the transformers versions we pin (5.17 to 5.39)."""

from __future__ import annotations

import inspect
from functools import cache


@cache
def cache_argument_name(model_class: type) -> str:
    """The KV-cache keyword of a model's or a decoder layer's forward: `cache` in recent 5.x,
    `past_key_values` before; GPT-NeoX's layers take `layer_past`."""
    for klass in model_class.__mro__:
        forward = klass.__dict__.get("forward")
        if forward is None:
            continue
        params = inspect.signature(forward).parameters
        for name in ("cache", "past_key_values", "layer_past"):
            if name in params:
                return name
    return "past_key_values"

