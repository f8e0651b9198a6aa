"""int8 rows: `weight ~ q * scale` per output row, q in [-127, 127], scale = max |row| / 127 (symmetric,
weight-only). Rounding and unpacking; the modules that serve it are in `services/family/int8.py`."""

from __future__ import annotations

import torch

Q8_MAX = 127  # symmetric int8: -Q8_MAX..Q8_MAX, so a row's scale is its largest magnitude over Q8_MAX


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [rows, n], scale fp32 [rows]) with weight ~ q * scale[:, None], per row."""
    scale = weight.detach().float().abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / Q8_MAX  # [rows]
    q = torch.round(weight.detach().float() / scale[:, None]).clamp(-Q8_MAX, Q8_MAX).to(torch.int8)  # [rows, n]
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """In fp32, then `dtype`: a half-precision scale would round every row, and small ones would vanish."""
    return (q.float() * scale.float()[:, None]).to(dtype)  # [rows, n]
