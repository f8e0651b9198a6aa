"""Prompt scoring: each token's log-probability given the ones before it, several prompts per forward.

Prompts are right-padded into one batch through the decoder; the output head then runs on each prompt's own
positions only, so no [batch, longest, vocab] tensor is ever made. The last position also gives the greedy next
token, so a client asking for the prompt's log-likelihood and one generated token needs one forward, not two.
"""

from __future__ import annotations

import torch

from services.engine.detokenize import text_decoder
from services.engine.interface import NextToken, ScoreResult, TokenLogprob


def _padded_batch(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both [batch, longest], right-padded: positions stay 0..len-1."""
    longest = max(len(ids) for ids in prompts)
    input_ids = torch.tensor([ids + [pad_id] * (longest - len(ids)) for ids in prompts], device=device)
    mask = torch.tensor([[1] * len(ids) + [0] * (longest - len(ids)) for ids in prompts], device=device)
    return input_ids, mask


def top_by_text(logits: torch.Tensor, normaliser: torch.Tensor, k: int, decode) -> list[dict[str, float]]:
    """The k likeliest tokens of each row of logits [rows, vocab], as {text: logprob}; where two tokens decode
    alike, the likelier one's."""
    values, ids = torch.topk(logits, k)  # [rows, k]
    values = values - normaliser[:, None]
    rows = []
    for row_values, row_ids in zip(values.tolist(), ids.tolist()):
        top: dict[str, float] = {}
        for value, token in zip(row_values, row_ids):
            top.setdefault(decode([token]), value)
        rows.append(top)
    return rows


def _score_row(logits: torch.Tensor, prompt_ids: list[int], top_logprobs: int, tokenizer,
               eos_ids: set[int]) -> ScoreResult:
    """One prompt's result from its logits [seq, vocab] (position i predicts token i + 1)."""
    decode = tokenizer.decode
    # log-softmax by its normaliser alone: no second tensor of the logits' size for a long prompt
    normaliser = torch.logsumexp(logits, dim=-1)  # [seq]
    targets = torch.tensor(prompt_ids[1:], device=logits.device)  # [seq-1]
    chosen = logits[:-1].gather(-1, targets[:, None])[:, 0] - normaliser[:-1]  # [seq-1]
    tops = [None, *top_by_text(logits[:-1], normaliser[:-1], top_logprobs, decode)] if top_logprobs else []
    next_id = int(logits[-1].argmax())
    next_top = top_by_text(logits[-1:], normaliser[-1:], top_logprobs, decode)[0] if top_logprobs else {}
    next_logprob = TokenLogprob(decode([next_id]), float(logits[-1, next_id] - normaliser[-1]), next_top)
    next_token = NextToken(next_id, text_decoder(tokenizer)([next_id]), next_logprob, next_id in eos_ids)
    tokens = tuple(decode([t]) for t in prompt_ids)
    return ScoreResult(tuple(prompt_ids), tokens, (None, *map(float, chosen)), tuple(tops), next_token)


@torch.inference_mode()
def score_prompts(model, prompts: list[list[int]], top_logprobs: int, tokenizer, eos_ids: set[int],
                  pad_id: int) -> list[ScoreResult]:
    """Every prompt scored in one forward of the decoder; the head runs per prompt on its own positions."""
    device = next(model.parameters()).device
    input_ids, mask = _padded_batch(prompts, pad_id, device)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=mask,
                                 use_cache=False).last_hidden_state  # [batch, longest, hidden]
    head = model.get_output_embeddings()
    return [_score_row(head(hidden[row, :len(ids)]).float(), ids, top_logprobs, tokenizer, eos_ids)
            for row, ids in enumerate(prompts)]
