"""Which waiting requests are prefilled together. Pure Python: the scheduler hands in prompt lengths.

A batch's prompts are padded to its longest, so a long prompt taken with many short ones costs as many long
prefills, and the short ones' first tokens wait for all of it. Requests are therefore grouped by length: the
oldest that fits, then, in order of arrival, those that keep the batch's padded prompt tokens within
`MAX_PADDING` of its real ones (or its padding within `PADDING_ALLOWANCE`); the others stay waiting for the
next batch, which may start in the same loop. Under a budget of prompt tokens (beside a prefill in chunks), a
short request may pass a long one that would wait for that prefill anyway.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MAX_PADDING = 1.25  # a batch's padded prompt tokens (rows x longest) at most this times its real ones
# padded positions accepted whatever the ratio: a batch of its own would cost about as much (a pass over the weights)
PADDING_ALLOWANCE = 32


def similar_prompts(lengths: Sequence[int], count: int, budget: float = math.inf) -> list[int]:
    """Indices into `lengths` (prompt lengths in order of arrival) of at most `count` requests to prefill as
    one batch whose padded tokens stay within `budget`: the first that fits, and after it those of a similar
    length. Empty where none fits."""
    picked: list[int] = []
    longest = total = 0
    for index, length in enumerate(lengths):
        if len(picked) == count:
            break
        grown_longest, grown_total = max(longest, length), total + length
        padded = grown_longest * (len(picked) + 1)
        too_padded = padded > MAX_PADDING * grown_total and padded - grown_total > PADDING_ALLOWANCE
        if padded > budget or (picked and too_padded):
            continue
        picked.append(index)
        longest, total = grown_longest, grown_total
    return picked
