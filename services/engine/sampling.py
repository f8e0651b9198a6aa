"""Next-token choice per sequence: greedy, or temperature / top-k / top-p / min-p sampling with a seeded
generator."""

from __future__ import annotations

import torch

from services.engine.interface import MIN_TEMPERATURE, SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p (nucleus) and min-p on one row of logits [vocab]."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)  # [vocab]
        logits = logits.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    return logits


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < MIN_TEMPERATURE


def choose_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from one row of logits [vocab]."""
    if is_greedy(params):
        return int(logits.argmax())
    probs = filter_logits(logits.float(), params).softmax(-1)
    if not torch.isfinite(probs).all():
        return int(logits.argmax())
    return int(torch.multinomial(probs, 1, generator=generator))
