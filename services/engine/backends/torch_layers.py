"""The torch step backend: a group's own Hugging Face decoder layers, run on the batch's KV buffers.

Any device, dtype and architecture of the table (`family/architectures`): a KV stand-in (`LayerKV`) writes each
call's keys and values into the group's buffers at the filled length and hands the layer every filled position;
a per-row attention mask (boolean for SDPA, additive for eager attention, as transformers builds them) hides
left padding, later positions and, where the layer has a sliding window, keys beyond it. Prefill runs every
group through here, whichever backend decodes it.
"""

from __future__ import annotations

import torch
from torch import nn

from services.errors import UnsupportedArchitectureError
from services.family.compat import cache_argument_name
from services.family.int8 import float_dtype

# attention implementations whose mask we build: a 4-D mask, boolean or added to the scores
MASK_KINDS = ("sdpa", "eager")


class LayerKV:
    """Stands in for a KV cache in one layer's forward: writes the call's keys and values at `start` of the
    group's buffers and hands back every filled position for the layer's attention."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, start: int):
        self.keys, self.values, self.start = keys, values, start  # [rows, kv_heads, capacity, head_dim]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states, value_states: [rows, kv_heads, new, head_dim]
        end = self.start + key_states.shape[-2]
        self.keys[:, :, self.start:end] = key_states
        self.values[:, :, self.start:end] = value_states
        return self.keys[:, :, :end], self.values[:, :, :end]  # [rows, kv_heads, end, head_dim]


def sliding_window(layer: nn.Module, attention_name: str) -> int | None:
    """How far back the layer's queries see, as its own attention decides: Qwen2/Qwen3 set it per layer,
    Mistral reads its config; None: every earlier key."""
    attention = getattr(layer, attention_name)
    if hasattr(attention, "sliding_window"):
        return attention.sliding_window
    config = attention.config
    return getattr(config, "sliding_window", None) if config.model_type == "mistral" else None


def allowed_keys(filled: torch.Tensor, queries_at: torch.Tensor, window: int | None) -> torch.Tensor:
    """Which keys each query attends, [rows, queries, keys]: filled (not padding), not later, within the
    window; a query always attends itself, so a padding query's softmax is never empty.
    filled: [rows, keys] bool; queries_at: [queries], the queries' positions in the buffers."""
    keys_at = torch.arange(filled.shape[1], device=filled.device)  # [keys]
    distance = queries_at[:, None] - keys_at[None]  # [queries, keys]
    visible = distance >= 0
    if window is not None:
        visible &= distance < window  # as transformers' sliding_window_overlay: key > query - window
    allowed = filled[:, None, :] & visible[None]  # [rows, queries, keys]
    return allowed | (distance == 0)[None]


class LayerStep:
    """A group's decoder layers run through their own forward (prefill, and decode where the native backend
    does not apply)."""

    def __init__(self, layers: list[nn.Module], attention_name: str):
        self.layers = layers
        self.windows = [sliding_window(layer, attention_name) for layer in layers]
        config = getattr(layers[0], attention_name).config
        if config._attn_implementation not in MASK_KINDS:
            raise UnsupportedArchitectureError(
                f"attention implementation {config._attn_implementation!r} is not served (its mask is not a "
                f"4-D one); load the models with one of: {', '.join(MASK_KINDS)}")
        self.boolean = config._attn_implementation == "sdpa"
        self.cache_arg = cache_argument_name(type(layers[0]))
        self.dtype = float_dtype(layers[0])

    def _masks(self, filled: torch.Tensor, queries_at: torch.Tensor) -> dict[int | None, torch.Tensor]:
        """Per window of the layers: the attention mask [rows, 1, queries, keys] the layers' attention takes."""
        masks = {}
        for window in set(self.windows):
            allowed = allowed_keys(filled, queries_at, window)[:, None]  # [rows, 1, queries, keys]
            if self.boolean:
                masks[window] = allowed
            else:
                additive = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
                masks[window] = additive.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return masks

    def run(self, hidden: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], start: int,
            filled: torch.Tensor, position_ids: torch.Tensor,
            position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """hidden [rows, new, hidden_size] after the layers, for `new` positions from `start` (filled
        [rows, start + new], 1 where a position holds a token; position_ids [rows, new]; cos, sin
        [rows, new, rotary dim] in the layers' dtype)."""
        queries_at = torch.arange(start, start + hidden.shape[1], device=hidden.device)  # [new]
        masks = self._masks(filled.bool(), queries_at)
        for layer, window, layer_keys, layer_values in zip(self.layers, self.windows, keys, values):
            hidden = layer(hidden, attention_mask=masks[window], position_ids=position_ids,
                           position_embeddings=position_embeddings, use_cache=True,
                           **{self.cache_arg: LayerKV(layer_keys, layer_values, start)})
        return hidden

    def step(self, hidden: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], length: int,
             mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """hidden [rows, hidden_size] after the layers; writes position `length` of each layer's buffers.
        mask [rows, length + 1] (1: attend); cos, sin [rows, rotary dim] fp32; positions [rows]."""
        position_embeddings = (cos.to(self.dtype)[:, None], sin.to(self.dtype)[:, None])  # [rows, 1, rotary dim]
        out = self.run(hidden[:, None], keys, values, length, mask, positions[:, None], position_embeddings)
        return out[:, 0]  # [rows, hidden_size]
