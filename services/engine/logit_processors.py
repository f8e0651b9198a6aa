"""Per-row logit adjustments clients ask for: repetition, presence and frequency penalties, logit bias and
`min_tokens`. One pass over [rows, vocab] for every row that asks, whatever mix of settings the rows carry;
rows that ask for nothing are left untouched (and keep the fast greedy paths)."""

from __future__ import annotations

from collections.abc import Sequence as Rows

import torch

from services.engine.interface import SamplingParams


def adjusts_logits(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
                or params.logit_bias or params.min_tokens)


def _padded(id_lists: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid), both [rows, longest]: ragged id lists padded with token 0, marked invalid."""
    longest = max(1, max(len(ids) for ids in id_lists))
    ids = torch.zeros(len(id_lists), longest, dtype=torch.long, device=device)
    valid = torch.zeros(len(id_lists), longest, dtype=torch.bool, device=device)
    for row, row_ids in enumerate(id_lists):
        ids[row, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        valid[row, :len(row_ids)] = True
    return ids, valid


def _counts(id_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Occurrences of each token per row, [rows, vocab]."""
    ids, valid = _padded(id_lists, device)
    counts = torch.zeros(len(id_lists), vocab, device=device)
    return counts.scatter_add_(1, ids, valid.float())


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, device=device)[:, None]  # [rows, 1]


def _penalise(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
              generated: list[list[int]]) -> torch.Tensor:
    """Repetition (over prompt and answer, as vLLM), then frequency and presence (answer only); [rows, vocab]."""
    vocab, device = logits.shape[-1], logits.device
    counts = _counts(generated, vocab, device)  # [rows, vocab]
    repetition = _column([p.repetition_penalty for p in params], device)  # [rows, 1]
    seen = (counts > 0) | (_counts(prompts, vocab, device) > 0)  # [rows, vocab]
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, repeated, logits)
    logits = logits - _column([p.frequency_penalty for p in params], device) * counts
    return logits - _column([p.presence_penalty for p in params], device) * (counts > 0)


def _bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    entries = [(row, token, bias) for row, p in enumerate(params) for token, bias in p.logit_bias]
    if not entries:
        return logits
    rows, tokens, biases = zip(*entries)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
    return logits.index_put(index, torch.tensor(biases, device=logits.device), accumulate=True)


def _bar_endings(logits: torch.Tensor, params: list[SamplingParams], generated: list[list[int]],
                 eos_ids: set[int]) -> torch.Tensor:
    """Rows short of their `min_tokens` may not end: their end-of-sequence and stop tokens get -inf."""
    entries = [(row, token) for row, (p, ids) in enumerate(zip(params, generated)) if len(ids) < p.min_tokens
               for token in (() if p.ignore_eos else tuple(eos_ids)) + p.stop_token_ids]
    if not entries:
        return logits
    rows, tokens = zip(*entries)
    index = (torch.tensor(rows, device=logits.device), torch.tensor(tokens, device=logits.device))
    return logits.index_put(index, torch.tensor(float("-inf"), device=logits.device))


def apply_logit_processors(logits: torch.Tensor, params: Rows[SamplingParams], prompts: Rows[list[int]],
                           generated: Rows[list[int]], eos_ids: set[int]) -> torch.Tensor:
    """Logits [batch, vocab] with each row's adjustments applied; the input is returned where no row asks."""
    rows = [row for row, p in enumerate(params) if adjusts_logits(p)]
    if not rows:
        return logits
    picked = [params[row] for row in rows]
    answers = [list(generated[row]) for row in rows]
    adjusted = _penalise(logits[rows], picked, [list(prompts[row]) for row in rows], answers)  # [rows, vocab]
    adjusted = _bar_endings(_bias(adjusted, picked), picked, answers, eos_ids)
    out = logits.clone()
    out[rows] = adjusted
    return out
