"""Prompt scoring: each token's log-probability given the ones before it, several prompts per forward.

Prompts are right-padded into one batch through the decoder; the output head then runs on each prompt's own
positions only, so no [batch, longest, vocab] tensor is ever made. The last position also gives the greedy next
token, so a client asking for the prompt's log-likelihood and one generated token needs one forward, not two.

Prompts that share a prefix (one context with each of its answer choices) are packed into one row: the prefix
once, then each prompt's own tokens, with a mask that lets each see the prefix and itself only and positions
that continue the prefix (`shared_prefixes`); the prefix's logits are computed once too.
"""

from __future__ import annotations

import torch

from services.engine.backends.torch_layers import MASK_KINDS, sliding_window
from services.engine.detokenize import text_decoder
from services.engine.interface import NextToken, ScoreResult, TokenLogprob
from services.engine.shared_prefixes import PrefixGroup, group_by_prefix
from services.family.int8 import float_dtype

PREFIX, PADDING = -1, -2  # segment ids of packed positions that are not a member's own tokens


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


def packs_prompts(layers, attention_name: str, config) -> bool:
    """Whether prompts may share a row: the attention takes a 4-D mask of ours and no layer has a window."""
    return (config._attn_implementation in MASK_KINDS
            and all(sliding_window(layer, attention_name) is None for layer in layers))


def _packed_rows(prompts: list[list[int]], groups: list[PrefixGroup], pad_id: int, device):
    """input_ids, position_ids and segments [rows, longest]: per group its prefix, then each member's own
    tokens (segment: the member's index; PREFIX for the prefix, PADDING after the row's end)."""
    rows = []
    for group in groups:
        first = prompts[group.members[0]]
        ids, positions, segments = first[:group.shared], list(range(group.shared)), [PREFIX] * group.shared
        for member in group.members:
            own = prompts[member][group.shared:]
            ids, positions = ids + own, positions + list(range(group.shared, group.shared + len(own)))
            segments += [member] * len(own)
        rows.append((ids, positions, segments))
    longest = max(len(ids) for ids, _, _ in rows)
    pad = [longest - len(ids) for ids, _, _ in rows]
    input_ids = torch.tensor([ids + [pad_id] * n for (ids, _, _), n in zip(rows, pad)], device=device)
    position_ids = torch.tensor([pos + [0] * n for (_, pos, _), n in zip(rows, pad)], device=device)
    segments = torch.tensor([seg + [PADDING] * n for (_, _, seg), n in zip(rows, pad)], device=device)
    return input_ids, position_ids, segments


def _packed_mask(segments: torch.Tensor, dtype: torch.dtype, boolean: bool) -> torch.Tensor:
    """[rows, 1, longest, longest]: a query sees earlier keys of the prefix and of its own segment, and itself."""
    at = torch.arange(segments.shape[1], device=segments.device)  # [longest]
    # built in place: the mask is the largest tensor of a scoring, and the memory bound counts one
    allowed = segments[:, None, :] == segments[:, :, None]  # [rows, queries, keys]
    allowed |= (segments == PREFIX)[:, None, :]
    allowed &= (at[None, :] <= at[:, None])[None]
    allowed.diagonal(dim1=1, dim2=2).fill_(True)
    if boolean:
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]


def _score_packed(model, prompts: list[list[int]], groups: list[PrefixGroup], top_logprobs: int, tokenizer,
                  eos_ids: set[int], pad_id: int) -> dict[int, ScoreResult]:
    """The prompts of `groups`, a row per group, by their index in `prompts`."""
    device = next(model.parameters()).device
    input_ids, position_ids, segments = _packed_rows(prompts, groups, pad_id, device)  # [rows, longest] each
    mask = _packed_mask(segments, float_dtype(model), model.config._attn_implementation == "sdpa")
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                 use_cache=False).last_hidden_state  # [rows, longest, hidden]
    head, results = model.get_output_embeddings(), {}
    for row, group in enumerate(groups):
        prefix = head(hidden[row, :group.shared]).float()  # [shared, vocab], once for every member
        start = group.shared
        for member in group.members:
            end = start + len(prompts[member]) - group.shared
            own = head(hidden[row, start:end]).float()  # [own tokens, vocab]
            logits = torch.cat([prefix, own]) if group.shared else own
            results[member] = _score_row(logits, prompts[member], top_logprobs, tokenizer, eos_ids)
            start = end
    return results


def _score_padded(model, prompts: list[list[int]], members: list[int], top_logprobs: int, tokenizer,
                  eos_ids: set[int], pad_id: int) -> dict[int, ScoreResult]:
    """The prompts `members`, right-padded, a row each, by their index in `prompts`."""
    chosen = [prompts[i] for i in members]
    input_ids, mask = _padded_batch(chosen, pad_id, next(model.parameters()).device)
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=mask,
                                 use_cache=False).last_hidden_state  # [rows, longest, hidden]
    head = model.get_output_embeddings()
    return {i: _score_row(head(hidden[row, :len(ids)]).float(), ids, top_logprobs, tokenizer, eos_ids)
            for row, (i, ids) in enumerate(zip(members, chosen))}


@torch.inference_mode()
def score_prompts(model, prompts: list[list[int]], top_logprobs: int, tokenizer, eos_ids: set[int],
                  pad_id: int, pack_up_to: int | None = None, rows_per_forward: int | None = None
                  ) -> list[ScoreResult]:
    """Every prompt scored, `rows_per_forward` rows per forward of the decoder (None: all in one); the head runs
    per prompt on its own positions. `pack_up_to`: prompts sharing a prefix go into one row of at most this
    many tokens (None: never)."""
    groups = (group_by_prefix(prompts, pack_up_to) if pack_up_to is not None
              else [PrefixGroup((i,), 0) for i in range(len(prompts))])
    step, results = rows_per_forward or len(groups), {}
    for start in range(0, len(groups), step):
        chunk = groups[start:start + step]
        if any(group.shared for group in chunk):
            results.update(_score_packed(model, prompts, chunk, top_logprobs, tokenizer, eos_ids, pad_id))
        else:
            members = [group.members[0] for group in chunk]
            results.update(_score_padded(model, prompts, members, top_logprobs, tokenizer, eos_ids, pad_id))
    return [results[i] for i in range(len(prompts))]
