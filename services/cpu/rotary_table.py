"""Rotary cos/sin looked up by position: computed by the model's own rotary module once per block of
positions, instead of once per decode step (a handful of small torch ops, a few percent of a small
variant's step). Only for RoPE kinds whose frequencies do not depend on the positions seen so far."""

from __future__ import annotations

import torch
from torch import nn

MIN_POSITIONS = 256  # computed at first; the table doubles when a position goes past it


def table_allowed(rotary: nn.Module) -> bool:
    """Whether cos/sin at a position are fixed: not "dynamic" or "longrope", which rescale as sequences grow."""
    rope_type = getattr(rotary, "rope_type", "default")
    return isinstance(rope_type, str) and "dynamic" not in rope_type and rope_type != "longrope"


class RotaryTable:
    """cos, sin [positions, head_dim] from `rotary` (fp32); `lookup` grows it as needed."""

    def __init__(self, rotary: nn.Module):
        self.rotary = rotary
        self.tables = self._compute(MIN_POSITIONS)  # replaced whole when grown: readers keep a consistent pair

    @torch.inference_mode()
    def _compute(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(count)[None]  # [1, count]
        probe = torch.empty(1, count, 1)  # the module reads only its dtype and device
        cos, sin = self.rotary(probe, positions)  # [1, count, head_dim] each
        return cos[0].float().contiguous(), sin[0].float().contiguous()

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [batch, head_dim] at `positions` [batch]."""
        cos, sin = self.tables
        needed = int(positions.max()) + 1
        if needed > cos.shape[0]:
            self.tables = cos, sin = self._compute(max(needed, 2 * cos.shape[0]))
        return cos[positions], sin[positions]


def rotary_lookup(rotary: nn.Module):
    """`(positions [batch]) -> (cos, sin) [batch, head_dim]` for `rotary`: a table kept on the module where
    allowed, else the module itself per call."""
    if not table_allowed(rotary):
        def direct(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            cos, sin = rotary(torch.empty(len(positions), 1, 1), positions[:, None])  # [batch, 1, head_dim]
            return cos[:, 0].float().contiguous(), sin[:, 0].float().contiguous()
        return direct
    table = rotary.__dict__.get("_boomerang_rotary_table")
    if table is None:
        table = rotary.__dict__["_boomerang_rotary_table"] = RotaryTable(rotary)
    return table.lookup
