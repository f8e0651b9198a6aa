"""Baseline recipes as pure data: ShortGPT drops the lowest-influence layers, LaCo's merge arithmetic and search,
the naive layout; each gives exactly n layers at every size of the family."""

import pytest

from services.errors import InvalidRequestError
from services.eval.baselines import parse_baselines
from services.eval.baselines.laco_search import LacoSettings, laco_search
from services.eval.baselines.plans import identity_recipe, is_referenced, merge, naive_recipe, shortgpt_keep
from services.family.plan import layout_from_rule, plan_family

LAYOUT = layout_from_rule(30)  # the default pair's: 16 to 30 layers
SIZES = sorted(plan_family(LAYOUT, "last"))


def teacher_layers(recipe) -> list[int]:
    return [i for terms in recipe for i, _ in terms]


def test_shortgpt_drops_the_lowest_influence_layers_at_every_size():
    influence = [0.5, 0.1, 0.3, 0.05, 0.2, 0.4, 0.1]
    assert shortgpt_keep(influence, 7) == tuple(range(7))
    assert shortgpt_keep(influence, 5) == (0, 2, 4, 5, 6)  # 3 lowest, then 1 before 6 among the equal 0.1s
    assert shortgpt_keep(influence, 2) == (0, 5)
    influence = [(7 * i) % 30 / 30 for i in range(30)]
    for n in SIZES:
        kept = shortgpt_keep(influence, n)
        dropped = set(range(30)) - set(kept)
        assert len(kept) == n and list(kept) == sorted(kept)
        assert all(influence[d] <= influence[k] for d in dropped for k in kept)
    with pytest.raises(InvalidRequestError):
        shortgpt_keep(influence, 31)


def test_laco_merge_is_theta_l_plus_the_differences_of_the_layers_above():
    recipe = merge(identity_recipe(range(8)), 3, 3)  # θ3 + (θ4-θ3) + (θ5-θ3) + (θ6-θ3)
    assert recipe == (((0, 1),), ((1, 1),), ((2, 1),), ((3, -2), (4, 1), (5, 1), (6, 1)), ((7, 1),))
    assert merge(identity_recipe(range(4)), 1, 1)[1] == ((2, 1),)  # one layer above: layer l is dropped
    again = merge(recipe, 2, 1)  # a merged layer merged again: θ2 + (θ_merged − θ2)
    assert again[2] == ((3, -2), (4, 1), (5, 1), (6, 1)) and len(again) == 4
    nested = merge(recipe, 3, 1)  # the merged layer as the base: θ_merged + (θ7 − θ_merged) = θ7
    assert nested[3] == ((7, 1),) and is_referenced(nested[3])
    for terms in (*recipe, *again, *nested):
        assert sum(c for _, c in terms) == 1
    with pytest.raises(InvalidRequestError):
        merge(recipe, 4, 1)


def test_laco_search_reaches_every_size_top_down_and_counts_fallbacks():
    generous = laco_search(30, 30, lambda r: 1.0)
    assert generous.recipe == identity_recipe(range(30)) and generous.accepted == generous.fallbacks == 0
    settings = LacoSettings(combined=4, lowest=1, interval=2, threshold=0.5)
    for n in SIZES:
        for similarity in (lambda r: 1.0, lambda r: 0.0, lambda r: 1.0 if r[-1] == ((29, 1),) else 0.0):
            result = laco_search(30, n, similarity, settings)
            assert len(result.recipe) == n
            layers = teacher_layers(result.recipe)
            assert layers == sorted(set(layers))  # each teacher layer in one place at most, in order
            assert result.recipe[0] == ((0, 1),)  # below the lowest layer nothing merges
    first = laco_search(30, 27, lambda r: 1.0, settings).recipe
    assert first[-1] == ((26, -2), (27, 1), (28, 1), (29, 1)) and first[:-1] == identity_recipe(range(26))
    accepted = laco_search(30, 16, lambda r: 1.0, settings)
    assert accepted.fallbacks == 0 and accepted.accepted >= 14 // 3
    blocked = laco_search(30, 16, lambda r: 0.0, settings)
    assert blocked.accepted == 0 and blocked.fallbacks >= 14 // 3


def test_laco_teacher_layers_cancel_only_inside_a_merge():
    """A layer that cancels out (coefficient 0) vanishes: merged recipes need not name every teacher layer."""
    recipe = merge(identity_recipe(range(5)), 2, 1)
    assert teacher_layers(recipe) == [0, 1, 3, 4]


def test_naive_recipe_is_the_student_layout_with_teacher_layers():
    plans = plan_family(LAYOUT, "last")
    for n, plan in plans.items():
        recipe = naive_recipe(LAYOUT, plan)
        assert len(recipe) == n and all(is_referenced(t) for t in recipe)
        assert teacher_layers(recipe) == sorted(set(teacher_layers(recipe)))
    assert teacher_layers(naive_recipe(LAYOUT, plans[16])) == list(LAYOUT.copied_teacher_layers)
    assert teacher_layers(naive_recipe(LAYOUT, plans[30])) == list(range(30))


def test_baseline_names_parse_and_unknown_ones_are_refused():
    assert parse_baselines("naive, laco,shortgpt,naive") == ("naive", "laco", "shortgpt")
    with pytest.raises(InvalidRequestError, match="unknown baseline 'sparsegpt'"):
        parse_baselines("naive,sparsegpt")
