"""References for the engine's batches: the transformers forward of one variant, one row, no cache."""

from __future__ import annotations

import torch


@torch.inference_mode()
def forward_logits(model, tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), vocab] of the variant's own forward over `tokens` (fp32)."""
    return model(torch.tensor([tokens]), use_cache=False).logits[0].float()


def greedy_tokens(model, prompt: list[int], steps: int) -> list[int]:
    """`steps` greedy tokens after `prompt`, each from a full forward (no cache, no padding)."""
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(forward_logits(model, tokens)[-1].argmax()))
    return tokens[len(prompt):]


def step_logits(model, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """The logits [len(answer), vocab] each answer token was chosen from, by the forward of one row."""
    return forward_logits(model, prompt + answer)[len(prompt) - 1:len(prompt) - 1 + len(answer)]


def record_logits(batch, record: dict) -> None:
    """Makes `batch` append each live row's logits [vocab] to `record[id(sequence)]` before choosing."""
    advance = batch._advance

    def recording(logits: torch.Tensor) -> None:
        for row, seq in enumerate(batch.sequences):
            if not seq.done:
                record.setdefault(id(seq), []).append(logits[row].clone())
        advance(logits)
    batch._advance = recording
