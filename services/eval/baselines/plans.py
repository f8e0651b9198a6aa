"""Layer recipes of the training-free baselines: pure data, no torch.

A recipe lists, per decoder layer of a pruned model, its weights as an integer combination of the teacher's
layers: `((7, 1),)` is teacher layer 7 itself (referenced, never copied), `((4, -2), (5, 1), (6, 1), (7, 1))`
is a LaCo merge of layers 4..7. Coefficients always sum to 1.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from services.errors import InvalidRequestError
from services.family.plan import STUDENT, StudentLayout, VariantPlan

Terms = tuple[tuple[int, int], ...]  # (teacher layer, coefficient), by layer
Recipe = tuple[Terms, ...]  # one entry per decoder layer, bottom to top


def identity_recipe(layers: Sequence[int]) -> Recipe:
    """The teacher's own layers, in the given order."""
    return tuple(((index, 1),) for index in layers)


def is_referenced(terms: Terms) -> bool:
    """A layer that is one teacher layer as it is (no new weights)."""
    return len(terms) == 1 and terms[0][1] == 1


def base_layer(terms: Terms) -> int:
    """The teacher layer a merged layer is built from (its lowest): it also lends its KV slot and config."""
    return terms[0][0]


def naive_recipe(layout: StudentLayout, plan: VariantPlan) -> Recipe:
    """A family plan with each student layer replaced by the teacher layer it was copied from (no distillation)."""
    return identity_recipe([layout.copied_teacher_layers[ref.index] if ref.source == STUDENT else ref.index
                            for ref in plan.layers])


def shortgpt_keep(influence: Sequence[float], num_layers: int) -> tuple[int, ...]:
    """Teacher layers kept at `num_layers`: all but the len - num_layers of lowest Block Influence (ties: lower
    index dropped first), in their order."""
    _check_size(len(influence), num_layers)
    ranked = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    dropped = set(ranked[: len(influence) - num_layers])
    return tuple(i for i in range(len(influence)) if i not in dropped)


def merge(recipe: Recipe, position: int, following: int) -> Recipe:
    """LaCo's RDSC merge of layer `position` with the `following` layers above it, in one layer:
    θ = θ_l + Σ_{k=1..m} (θ_{l+k} − θ_l) = Σ_{k=0..m} θ_{l+k} − m·θ_l, expanded in teacher layers."""
    if following < 1 or position < 0 or position + following >= len(recipe):
        raise InvalidRequestError(f"cannot merge layer {position} with {following} above it in {len(recipe)} layers")
    total: Counter[int] = Counter()
    for terms in recipe[position: position + following + 1]:
        total.update(dict(terms))
    for index, coefficient in recipe[position]:
        total[index] -= following * coefficient
    merged = tuple(sorted((i, c) for i, c in total.items() if c != 0))
    return recipe[:position] + (merged,) + recipe[position + following + 1:]


def _check_size(total: int, num_layers: int) -> None:
    if not 1 <= num_layers <= total:
        raise InvalidRequestError(f"{num_layers} layers is outside 1..{total}", param="num_layers")


def merge_size(recipe: Recipe, num_layers: int, combined: int) -> int:
    """Layers merged into the one below them next: `combined` - 1, fewer where that would pass the target."""
    return min(combined - 1, len(recipe) - num_layers)


def merge_positions(recipe: Recipe, following: int, lowest: int) -> range:
    """Every layer a merge of `following` layers above it may start at (from `lowest` where there is room)."""
    top = len(recipe) - following
    return range(lowest if lowest < top else 0, top)
