"""Short prompts through the native kernel, long ones through the layers' own forward.

A prompt's positions are rows of one `LayerStack` call: no per-operation overhead, which dominates a short
prompt's forward. The kernel's batched dot products and its attention (one query at a time) lose to torch's
GEMM and SDPA as rows grow, so past `NATIVE_PROMPT_ROWS` the torch backend runs the prompt
(docs/performance.md)."""

from __future__ import annotations

import torch

from services.engine.backends.native import NativeStep
from services.engine.backends.torch_layers import LayerStep

# prompt positions of all rows of one call at or below which the kernel is the faster of the two
NATIVE_PROMPT_ROWS = 96


class ShortPrompts:
    """A group's prefill: `native` for prompts of up to `NATIVE_PROMPT_ROWS` positions in all, else `stock`."""

    def __init__(self, native: NativeStep, stock: LayerStep):
        self.native, self.stock = native, stock

    def run(self, hidden: torch.Tensor, *args) -> torch.Tensor:
        """`LayerStep.run`'s arguments and result; hidden [rows, new, hidden_size]."""
        rows, new = hidden.shape[:2]
        step = self.native if rows * new <= NATIVE_PROMPT_ROWS else self.stock
        return step.run(hidden, *args)
