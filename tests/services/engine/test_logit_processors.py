"""Batched logit adjustments against a one-row-at-a-time reference written from vLLM's definitions."""

from __future__ import annotations

import torch
from torch.testing import assert_close

from services.engine.interface import SamplingParams
from services.engine.logit_processors import adjusts_logits, apply_logit_processors
from services.engine.sampling import filter_logits

VOCAB = 11
EOS = {2}


def _reference_row(logits: torch.Tensor, p: SamplingParams, prompt: list[int], answer: list[int]) -> torch.Tensor:
    logits = logits.clone()
    for token in set(prompt) | set(answer):
        value = logits[token]
        logits[token] = value / p.repetition_penalty if value > 0 else value * p.repetition_penalty
    for token in set(answer):
        logits[token] -= p.frequency_penalty * answer.count(token) + p.presence_penalty
    for token, bias in p.logit_bias:
        logits[token] += bias
    if len(answer) < p.min_tokens:
        for token in (set() if p.ignore_eos else EOS) | set(p.stop_token_ids):
            logits[token] = float("-inf")
    return logits


ROWS = [
    (SamplingParams(), [1, 3], [4, 4]),  # asks for nothing: left as it is
    (SamplingParams(repetition_penalty=1.3), [1, 3, 3], [5]),
    (SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [7], [4, 4, 4, 9]),
    (SamplingParams(logit_bias=((6, 5.0), (0, -2.5))), [1], []),
    (SamplingParams(min_tokens=3, stop_token_ids=(8,)), [1], [4, 5]),
    (SamplingParams(min_tokens=1, ignore_eos=True, stop_token_ids=(9,)), [1], []),
    (SamplingParams(repetition_penalty=0.8, frequency_penalty=-0.5, logit_bias=((4, 1.0),), min_tokens=9), [4, 10],
     [4, 1, 1]),
]


def test_each_row_is_adjusted_as_the_one_row_reference():
    torch.manual_seed(0)
    logits = torch.randn(len(ROWS), VOCAB)  # [rows, vocab]: positive and negative values
    params, prompts, answers = zip(*ROWS)
    got = apply_logit_processors(logits, params, prompts, answers, EOS)
    want = torch.stack([_reference_row(logits[i], *ROWS[i]) for i in range(len(ROWS))])
    assert_close(got, want)
    assert_close(got[0], logits[0])
    assert got[4, 2] == float("-inf") and got[4, 8] == float("-inf")  # min_tokens bars eos and the stop token
    assert torch.isfinite(got[5, 2]) and got[5, 9] == float("-inf")  # ignore_eos: eos is not an ending there


def test_rows_asking_nothing_return_the_same_tensor():
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(), SamplingParams(temperature=0.7, min_p=0.1), SamplingParams(top_k=3)]
    assert not any(adjusts_logits(p) for p in params)
    assert apply_logit_processors(logits, params, [[1]] * 3, [[]] * 3, EOS) is logits


def test_min_p_keeps_tokens_at_least_that_share_of_the_top_one():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.1, 0.06, 0.04]))
    kept = torch.isfinite(filter_logits(logits, SamplingParams(min_p=0.18)))  # threshold 0.09
    assert kept.tolist() == [True, True, True, False, False]
