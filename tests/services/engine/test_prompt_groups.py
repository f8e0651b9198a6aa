"""Grouping waiting requests by prompt length: pure, no torch."""

import math

from services.engine.prompt_groups import MAX_PADDING, PADDING_ALLOWANCE, similar_prompts


def _padding(lengths: list[int], picked: list[int]) -> float:
    """Padded ÷ real prompt tokens, or 1 where the padding is within the allowance."""
    chosen = [lengths[i] for i in picked]
    padded = max(chosen) * len(chosen)
    return 1.0 if padded - sum(chosen) <= PADDING_ALLOWANCE else padded / sum(chosen)


def test_similar_lengths_form_one_batch_in_order_of_arrival():
    assert similar_prompts([100, 110, 95, 120], count=8) == [0, 1, 2, 3]
    assert similar_prompts([100, 110, 95, 120], count=2) == [0, 1]


def test_a_long_prompt_is_not_batched_with_short_ones():
    lengths = [30, 500, 40, 480, 35]
    first = similar_prompts(lengths, count=8)
    assert first == [0, 2, 4]  # the oldest and the short ones after it
    rest = [lengths[i] for i in range(len(lengths)) if i not in first]
    assert similar_prompts(rest, count=8) == [0, 1]  # the two long ones, next
    assert _padding(lengths, first) <= MAX_PADDING


def test_padding_stays_bounded_for_any_arrival_order():
    for lengths in ([1, 20, 3, 40, 5, 60, 7, 80], [512, 1, 256, 300, 490, 2, 500], [64] * 5 + [65, 200, 63]):
        picked = similar_prompts(lengths, count=len(lengths))
        assert picked[0] == 0 and _padding(lengths, picked) <= MAX_PADDING


def test_short_prompts_go_together_whatever_their_ratio():
    assert similar_prompts([3, 7, 1, 5], count=8) == [0, 1, 2, 3]  # 12 padded positions


def test_under_a_budget_only_what_fits_and_short_ones_may_pass_a_long_one():
    assert similar_prompts([100, 100, 100], count=8, budget=256) == [0, 1]  # padded 200; a third: 300
    assert similar_prompts([400, 60, 50], count=8, budget=256) == [1, 2]  # the long one waits anyway
    assert similar_prompts([400, 300], count=8, budget=256) == []
    assert similar_prompts([], count=8, budget=math.inf) == []
