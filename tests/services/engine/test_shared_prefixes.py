"""Prompts grouped by the prefix they share (pure, no torch)."""

from __future__ import annotations

from services.engine.shared_prefixes import MIN_SHARED_TOKENS, PrefixGroup, group_by_prefix

CONTEXT = list(range(100, 100 + 2 * MIN_SHARED_TOKENS))
OTHER = list(range(300, 300 + 2 * MIN_SHARED_TOKENS))


def test_the_choices_of_a_context_share_it_and_other_prompts_stand_alone():
    prompts = [CONTEXT + [1], OTHER + [7, 8], CONTEXT + [2, 3], [5, 6, 7], CONTEXT + [4], OTHER + [9]]
    groups = group_by_prefix(prompts, max_length=1000)
    assert sorted(i for g in groups for i in g.members) == list(range(len(prompts)))  # each prompt once
    by_member = {i: g for g in groups for i in g.members}
    assert set(by_member[0].members) == {0, 2, 4} and by_member[0].shared == len(CONTEXT)
    assert set(by_member[1].members) == {1, 5} and by_member[1].shared == len(OTHER)
    assert by_member[3] == PrefixGroup((3,), 0)
    assert by_member[0].packed_length(prompts) == len(CONTEXT) + 1 + 2 + 1


def test_every_member_keeps_a_token_of_its_own_and_short_prefixes_are_not_shared():
    prompts = [CONTEXT, CONTEXT + [1, 2]]  # one prompt is the other's prefix
    (group,) = group_by_prefix(prompts, max_length=1000)
    assert group.shared == len(CONTEXT) - 1
    short = [CONTEXT[: MIN_SHARED_TOKENS - 1] + [1], CONTEXT[: MIN_SHARED_TOKENS - 1] + [2]]
    assert [g.shared for g in group_by_prefix(short, max_length=1000)] == [0, 0]


def test_a_group_never_packs_past_the_row_limit():
    prompts = [CONTEXT + [i] * 10 for i in range(5)]
    limit = len(CONTEXT) + 25  # room for two members' own tokens, not three
    groups = group_by_prefix(prompts, max_length=limit)
    assert all(g.packed_length(prompts) <= limit for g in groups)
    assert [len(g.members) for g in groups] == [2, 2, 1]
