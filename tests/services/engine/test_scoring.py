"""Prompts scored several per forward (right-padded, or packed where they share a prefix), against one plain
forward per prompt."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from services.engine.scoring import score_prompts
from services.family import load_family

PROMPTS = [[5, 17, 42, 9], [99, 7, 3, 250, 61, 11, 8, 30, 2], [12, 13], [40, 41, 42, 43, 44]]


def test_a_padded_batch_scores_each_prompt_as_its_own_forward(tiny_pair):
    family = load_family(*tiny_pair, device="cpu", name="tiny")
    tokenizer, eos_ids = family.tokenizer, {family.tokenizer.eos_token_id}
    for size in (family.sizes[0], family.sizes[-1]):
        model = family.variant(size)
        results = score_prompts(model, PROMPTS, 3, tokenizer, eos_ids, pad_id=0)
        for prompt, result in zip(PROMPTS, results):
            with torch.no_grad():
                logits = model(torch.tensor([prompt]), use_cache=False).logits[0].float()  # [seq, vocab]
            logprobs = torch.log_softmax(logits, -1)  # [seq, vocab]
            expected = logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
            assert result.logprobs[0] is None and result.token_ids == tuple(prompt)
            assert_close(torch.tensor(result.logprobs[1:]), expected)
            top = torch.topk(logprobs[0], 3).values  # tokens that decode alike share one key: compare the best
            assert_close(torch.tensor(max(result.top_logprobs[1].values())), top[0])
            assert result.next_token.token_id == int(logits[-1].argmax())
            assert_close(torch.tensor(result.next_token.logprob.logprob), logprobs[-1].max())
            assert 1 <= len(result.next_token.logprob.top) <= 3


CONTEXT = [7, 3, 19, 44, 5, 60, 21, 8, 13, 90, 4, 33]
CHOICES = [[CONTEXT + [17], PROMPTS[1], CONTEXT + [41, 2, 9], CONTEXT + [18]], [CONTEXT + [5], CONTEXT + [6]]]


@pytest.mark.parametrize("weights", ["float", "int8"])
def test_prompts_packed_around_a_shared_context_score_as_they_do_alone(tiny_pair, weights):
    family = load_family(*tiny_pair, device="cpu", name="tiny", weights=weights)
    tokenizer, eos_ids = family.tokenizer, {family.tokenizer.eos_token_id}
    for size in (family.sizes[0], family.sizes[-1]):
        model = family.variant(size)
        for prompts in CHOICES:
            alone = [score_prompts(model, [p], 3, tokenizer, eos_ids, pad_id=0)[0] for p in prompts]
            packed = score_prompts(model, prompts, 3, tokenizer, eos_ids, pad_id=0, pack_up_to=256)
            for want, got in zip(alone, packed):
                assert got.token_ids == want.token_ids and got.logprobs[0] is None
                assert_close(torch.tensor(got.logprobs[1:]), torch.tensor(want.logprobs[1:]), rtol=1e-4, atol=1e-5)
                assert got.next_token.token_id == want.next_token.token_id
                assert got.top_logprobs[1].keys() == want.top_logprobs[1].keys()
