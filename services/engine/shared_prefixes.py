"""Prompts of one scoring request grouped by the prefix they share (pure Python, no torch).

Log-likelihood clients send one context with each of its continuations (every answer choice of a multiple-choice
question), so a batch of prompts is mostly a few contexts repeated. A group's prefix is run once and each member
adds only its own tokens (`scoring`); a prompt that shares nothing long enough is a group of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_SHARED_TOKENS = 8  # a shorter common prefix saves less than packing it costs


@dataclass(frozen=True)
class PrefixGroup:
    """Prompts (by index) whose first `shared` tokens are equal; each keeps at least one token of its own."""

    members: tuple[int, ...]
    shared: int

    def packed_length(self, prompts: list[list[int]]) -> int:
        """Tokens of the group's one row: the prefix once, then every member's own tokens."""
        return self.shared + sum(len(prompts[i]) - self.shared for i in self.members)


def common_length(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


def _shared(prompts: list[list[int]], members: list[int], common: int) -> int:
    """What a group may share: its common prefix, less the last token of its shortest member."""
    return min(common, min(len(prompts[i]) for i in members) - 1)


def group_by_prefix(prompts: list[list[int]], max_length: int,
                    min_shared: int = MIN_SHARED_TOKENS) -> list[PrefixGroup]:
    """Groups covering every prompt once: prompts in sorted order join the group before them while their common
    prefix stays at least `min_shared` tokens and the group's row at most `max_length` tokens."""
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    groups: list[PrefixGroup] = []
    members, common = [order[0]], len(prompts[order[0]])
    for index in order[1:]:
        joined = min(common, common_length(prompts[members[-1]], prompts[index]))
        candidate = PrefixGroup((*members, index), _shared(prompts, [*members, index], joined))
        if candidate.shared >= min_shared and candidate.packed_length(prompts) <= max_length:
            members, common = [*members, index], joined
            continue
        groups.append(PrefixGroup(tuple(members), _shared(prompts, members, common) if len(members) > 1 else 0))
        members, common = [index], len(prompts[index])
    groups.append(PrefixGroup(tuple(members), _shared(prompts, members, common) if len(members) > 1 else 0))
    return groups
