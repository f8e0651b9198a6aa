"""Per-row logit adjustments clients ask for: repetition, presence and frequency penalties, logit bias and
`min_tokens`. One pass over [rows, vocab] for every row that asks, whatever mix of settings the rows carry;
rows that ask for nothing are left untouched (and keep the fast greedy paths)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence as Rows

import torch

from services.engine.interface import SamplingParams


def adjusts_logits(params: SamplingParams) -> bool:
    return bool(params.presence_penalty or params.frequency_penalty or params.repetition_penalty != 1.0
                or params.logit_bias or params.min_tokens)


def _penalties(params: SamplingParams, prompt: list[int], answer: list[int]) -> dict[int, tuple[bool, int]]:
    """The tokens a row's penalties touch: {token: (seen, count in the answer)}; `seen` (prompt or answer)
    only where the row asks for a repetition penalty."""
    counts = Counter(answer)
    touched = {token: (False, count) for token, count in counts.items()}
    if params.repetition_penalty != 1.0:
        touched = {token: (True, counts.get(token, 0)) for token in set(prompt) | counts.keys()}
    return touched


def _penalise(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
              generated: list[list[int]]) -> torch.Tensor:
    """Repetition (over prompt and answer, as vLLM), then frequency and presence (answer only); [rows, vocab].
    Only the tokens a row has seen change, so the work follows the rows' histories, not the vocabulary."""
    entries = [(row, token, seen, count, p) for row, (p, prompt, answer) in enumerate(zip(params, prompts, generated))
               for token, (seen, count) in _penalties(p, prompt, answer).items()]
    if not entries:
        return logits
    device = logits.device
    row_ids, token_ids, seen_flags, answer_counts, row_params = zip(*entries)
    rows = torch.tensor(row_ids, device=device)  # [touched]
    tokens = torch.tensor(token_ids, device=device)  # [touched]
    seen = torch.tensor(seen_flags, device=device)  # [touched]
    counts = torch.tensor([float(count) for count in answer_counts], device=device)  # [touched]
    repetition, frequency, presence = (torch.tensor([getattr(p, name) for p in row_params], device=device)
                                       for name in ("repetition_penalty", "frequency_penalty", "presence_penalty"))
    values = logits[rows, tokens]  # [touched]
    repeated = torch.where(values > 0, values / repetition, values * repetition)
    values = torch.where(seen, repeated, values)
    values = values - frequency * counts
    values = values - presence * (counts > 0)
    return logits.index_put((rows, tokens), values)


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
