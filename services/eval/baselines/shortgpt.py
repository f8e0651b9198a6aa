"""ShortGPT (Men et al. 2024): drop the layers that change their input least.

Block Influence of layer i is 1 − the mean, over every calibration token, of the cosine similarity between
the layer's input and output hidden states; it is measured once on the full teacher, and the size with n
layers keeps all but the L − n layers of lowest influence (`plans.shortgpt_keep`).
"""

from __future__ import annotations

import torch
from torch import nn

from services.family.architectures import ArchitectureSpec, get_path


def _hidden(value) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value  # older layers return (hidden, ...)


@torch.inference_mode()
def block_influence(model: nn.Module, spec: ArchitectureSpec, chunks: torch.Tensor,
                    batch_size: int = 4) -> list[float]:
    """BI of every decoder layer of `model` on `chunks` ([chunks, seq_len]), by hooks on the layers."""
    layers = get_path(model, spec.layers)
    totals = torch.zeros(len(layers), dtype=torch.float64)
    inputs: dict[int, torch.Tensor] = {}

    def before(index):
        def hook(_, args, kwargs):
            inputs[index] = args[0] if args else kwargs["hidden_states"]  # [b, seq, hidden]
        return hook

    def after(index):
        def hook(_, args, kwargs, output):
            cos = nn.functional.cosine_similarity(inputs.pop(index).float(), _hidden(output).float(), dim=-1)
            totals[index] += cos.double().sum()  # cos: [b, seq]
        return hook

    handles = [h for i, layer in enumerate(layers)
               for h in (layer.register_forward_pre_hook(before(i), with_kwargs=True),
                         layer.register_forward_hook(after(i), with_kwargs=True))]
    try:
        device = next(model.parameters()).device
        for batch in chunks.to(device).split(batch_size):  # [b, seq]
            model(batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return (1 - totals / chunks.numel()).tolist()
