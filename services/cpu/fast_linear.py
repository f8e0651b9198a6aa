"""Decode-time linear layers through the native GEMV kernel: same weights, the module's class swapped in place.

Like gpt-fast's module swaps, the model's code is untouched: `nn.Linear` instances become `FastLinear`, which
sends a few rows of fp32 CPU input (decode steps) to `services/cpu/kernels/gemv.cpp` and everything else
(prefill, training, other dtypes and devices) to `nn.Linear.forward`. Parameters are not copied.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from services.cpu.kernels.gemv import load_gemv

MAX_ROWS = 32  # measured here: the kernel beats torch 1.6-3x at 1-8 rows, 1.1x at 32; prefill goes to torch
ENV_SWITCH = "BOOMERANG_NATIVE_KERNELS"  # "0" keeps torch's matmul everywhere


class FastLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if (rows <= MAX_ROWS and x.dtype == self.weight.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            out = load_gemv()(x.reshape(rows, self.in_features), self.weight, self.bias)  # [rows, out]
            return out.view(*x.shape[:-1], self.out_features)
        return super().forward(x)


def native_kernels_wanted() -> bool:
    return os.environ.get(ENV_SWITCH, "1") != "0"


def enable_fast_linear(*models: nn.Module) -> int:
    """Swaps every plain `nn.Linear` of the models; returns how many (0 where the kernel is unavailable)."""
    if load_gemv() is None:
        return 0
    swapped = 0
    for model in models:
        for module in model.modules():
            if type(module) is nn.Linear:
                module.__class__ = FastLinear
                swapped += 1
    return swapped


def disable_fast_linear(model: nn.Module) -> None:
    """Back to stock `nn.Linear` (for baselines that must be plain transformers)."""
    for module in model.modules():
        if type(module) is FastLinear:
            module.__class__ = nn.Linear
