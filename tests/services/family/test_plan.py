"""Pure tests of layer plans: no torch."""

import pytest

from services.errors import InvalidPairError
from services.family.plan import (
    STUDENT,
    TEACHER,
    LayerRef,
    PatchOrder,
    block_choices,
    layout_from_rule,
    layout_from_student_config,
    order_to_json,
    parse_order,
    plan_family,
)


def test_default_rule_on_30_layers_matches_design():
    layout = layout_from_rule(30)
    assert layout.copied_teacher_layers == tuple(range(0, 29, 2)) + (29,)
    assert layout.num_student_layers == 16
    assert layout.blocks[0] == (0, 1) and layout.blocks[13] == (26, 27)
    assert layout.blocks[14:] == ((28,), (29,))
    assert layout.pruned_teacher_layers == tuple(range(1, 28, 2))


def test_aligned_hidden_states_map_block_ends():
    layout = layout_from_rule(30)
    pairs = layout.aligned_hidden_states
    assert len(pairs) == 17
    assert pairs[0] == (0, 0) and pairs[1] == (1, 2) and pairs[14] == (14, 28)
    assert pairs[15] == (15, 29) and pairs[-1] == (16, 30)


@pytest.mark.parametrize("order", ["last", "first"])
def test_every_size_reachable_once(order):
    plans = plan_family(layout_from_rule(30), order)
    assert sorted(plans) == list(range(16, 31))
    assert [plans[n].patched_blocks for n in range(16, 31)] == list(range(15))
    assert plans[16].is_student and plans[30].is_teacher
    for n, plan in plans.items():
        assert len(plan.layers) == n


def test_last_to_first_layers_and_components():
    plan = plan_family(layout_from_rule(30), "last")[17]
    assert plan.layers[:13] == tuple(LayerRef(STUDENT, i) for i in range(13))
    assert plan.layers[13:] == tuple(LayerRef(TEACHER, i) for i in (26, 27, 28, 29))
    assert (plan.embed, plan.norm, plan.head, plan.rotary) == (STUDENT, TEACHER, TEACHER, TEACHER)


def test_first_to_last_layers_and_components():
    plan = plan_family(layout_from_rule(30), PatchOrder.FIRST_TO_LAST)[18]
    assert plan.layers[:4] == tuple(LayerRef(TEACHER, i) for i in range(4))
    assert plan.layers[4:] == tuple(LayerRef(STUDENT, i) for i in range(2, 16))
    assert (plan.embed, plan.norm, plan.head) == (TEACHER, STUDENT, STUDENT)


def test_student_config_round_trip_and_validation():
    layout = layout_from_rule(12, first=1, every=3, last=1)
    assert layout_from_student_config(layout.to_student_config(), 12) == layout
    with pytest.raises(InvalidPairError, match="complement"):
        layout_from_student_config({"copied_teacher_layers": [0, 2], "pruned_teacher_layers": [1]}, 4)
    with pytest.raises(InvalidPairError, match="strictly increasing"):
        layout_from_student_config({"copied_teacher_layers": [0, 3, 2]}, 4)
    with pytest.raises(InvalidPairError, match="below the teacher"):
        layout_from_student_config({"copied_teacher_layers": [0, 5]}, 4)
    with pytest.raises(InvalidPairError, match="copied_teacher_layers"):
        layout_from_student_config({}, 4)


def test_every_three_skips_unreachable_counts():
    plans = plan_family(layout_from_rule(12, first=1, every=3, last=1), "last")
    assert sorted(plans) == [5, 6, 8, 10, 12]


def test_unknown_order_is_refused():
    with pytest.raises(InvalidPairError, match="unknown patch order"):
        plan_family(layout_from_rule(8), "middle")


def test_an_explicit_order_patches_only_the_blocks_it_names():
    layout = layout_from_rule(30)
    plans = plan_family(layout, [2, 5, 3, 4, 9, 10, 11, 0, 1, 13, 12, 7, 8, 6])
    assert sorted(plans) == list(range(16, 31))
    seventeen = plans[17]
    assert seventeen.layers[:2] == (LayerRef(STUDENT, 0), LayerRef(STUDENT, 1))
    assert seventeen.layers[2:4] == (LayerRef(TEACHER, 4), LayerRef(TEACHER, 5))
    assert seventeen.layers[4:] == tuple(LayerRef(STUDENT, i) for i in range(3, 16))
    assert (seventeen.embed, seventeen.norm, seventeen.head) == (STUDENT, STUDENT, STUDENT)
    assert plans[24].embed == TEACHER  # block 0 is patched 8th
    assert plans[30].is_teacher


def test_orders_parse_from_manifest_and_command_line_forms():
    assert parse_order("last") is PatchOrder.LAST_TO_FIRST
    assert parse_order("2,5, 3") == (2, 5, 3) == parse_order([2, 5, 3])
    assert order_to_json(parse_order("first")) == "first" and order_to_json((2, 5)) == [2, 5]


@pytest.mark.parametrize("order", [[0, 1], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 13], [14] + list(range(13))])
def test_an_order_must_name_every_multi_layer_block_once(order):
    with pytest.raises(InvalidPairError, match="exactly once"):
        plan_family(layout_from_rule(30), order)


@pytest.mark.parametrize("order", ["last", "first", (5, 2, 3, 4, 9, 10, 11, 0, 1, 13, 12, 7, 8, 6)])
def test_every_plan_walks_the_student_blocks_in_order(order):
    layout = layout_from_rule(30)
    for n, plan in plan_family(layout, order).items():
        choices = block_choices(layout, plan)
        assert len(choices) == layout.num_student_layers
        assert sum(len(block) if patched else 1 for block, patched in zip(layout.blocks, choices)) == n
    plans = plan_family(layout, order)
    assert not any(block_choices(layout, plans[min(plans)])) and all(block_choices(layout, plans[max(plans)]))
