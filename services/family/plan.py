"""Layer plans: pure data saying which teacher and student layers make each model of the family.

No torch here. `StudentLayout` records which teacher layers the student kept and which block of
teacher layers each student layer stands for; `plan_family` turns a layout and a patch order into one
`VariantPlan` per reachable layer count.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from services.errors import InvalidPairError

TEACHER = "teacher"
STUDENT = "student"


class PatchOrder(StrEnum):
    """Which end of the student is turned back into teacher blocks first."""

    LAST_TO_FIRST = "last"
    FIRST_TO_LAST = "first"

    @classmethod
    def parse(cls, value: str | PatchOrder) -> PatchOrder:
        aliases = {"last": cls.LAST_TO_FIRST, "last-to-first": cls.LAST_TO_FIRST,
                   "first": cls.FIRST_TO_LAST, "first-to-last": cls.FIRST_TO_LAST}
        if isinstance(value, PatchOrder):
            return value
        if value not in aliases:
            raise InvalidPairError(
                f"unknown patch order {value!r}; use one of {sorted(aliases)}", param="order")
        return aliases[value]


Order = PatchOrder | tuple[int, ...]  # an end to start from, or the multi-layer blocks in patch order


def parse_order(value: str | Sequence[int]) -> Order:
    """"last", "first", a list of student block indices, or the same list written "2,5,3"."""
    if isinstance(value, str) and value.replace(",", "").replace(" ", "").isdigit():
        return tuple(int(part) for part in value.split(","))
    if isinstance(value, str):
        return PatchOrder.parse(value)
    return tuple(int(i) for i in value)


def order_to_json(order: Order) -> str | list[int]:
    return order.value if isinstance(order, PatchOrder) else list(order)


@dataclass(frozen=True)
class StudentLayout:
    """Which teacher layers the student copied, and the block of teacher layers each one replaces."""

    num_teacher_layers: int
    copied_teacher_layers: tuple[int, ...]

    @property
    def num_student_layers(self) -> int:
        return len(self.copied_teacher_layers)

    @property
    def pruned_teacher_layers(self) -> tuple[int, ...]:
        kept = set(self.copied_teacher_layers)
        return tuple(i for i in range(self.num_teacher_layers) if i not in kept)

    @property
    def blocks(self) -> tuple[tuple[int, ...], ...]:
        """Teacher layers each student layer stands for: from its own copy up to the next copy."""
        ends = self.copied_teacher_layers[1:] + (self.num_teacher_layers,)
        return tuple(tuple(range(start, end)) for start, end in zip(self.copied_teacher_layers, ends))

    @property
    def aligned_hidden_states(self) -> tuple[tuple[int, int], ...]:
        """(student, teacher) indices into HF `hidden_states` that the cosine loss aligns.

        Index 0 is the embedding output, index i the output of layer i-1, and the last index the
        final normed output; student layer i is aligned with the last teacher layer of block i.
        """
        inner = tuple((i + 1, block[-1] + 1) for i, block in enumerate(self.blocks[:-1]))
        return ((0, 0),) + inner + ((self.num_student_layers, self.num_teacher_layers),)

    def to_student_config(self) -> dict[str, list[int]]:
        """The paper's `student_config.json` content."""
        return {"copied_teacher_layers": list(self.copied_teacher_layers),
                "pruned_teacher_layers": list(self.pruned_teacher_layers)}


def layout_from_rule(num_hidden_layers: int, first: int = 1, every: int = 2, last: int = 2) -> StudentLayout:
    """Keep `first` leading layers, then every `every`-th layer, then `last` trailing layers (30 -> 0,2,..,28,29)."""
    if num_hidden_layers < 1 or first < 0 or last < 0 or every < 1:
        raise InvalidPairError(
            f"invalid pruning rule: layers={num_hidden_layers}, first={first}, every={every}, last={last}")
    if first + last > num_hidden_layers:
        raise InvalidPairError(f"first={first} + last={last} exceeds the teacher's {num_hidden_layers} layers")
    if first < 1:
        raise InvalidPairError("the student must keep the teacher's first layer (use first >= 1)")
    middle_end = num_hidden_layers - last
    middle = range(first - 1 + every, middle_end, every)  # every n-th layer after the leading ones
    kept = list(range(first)) + list(middle) + list(range(middle_end, num_hidden_layers))
    return StudentLayout(num_hidden_layers, tuple(kept))


def layout_from_student_config(config: Mapping, num_teacher_layers: int) -> StudentLayout:
    """Validate the paper's `student_config.json` against the teacher's layer count."""
    if "copied_teacher_layers" not in config:
        raise InvalidPairError("student_config.json has no 'copied_teacher_layers'")
    copied = tuple(int(i) for i in config["copied_teacher_layers"])
    if not copied or list(copied) != sorted(set(copied)):
        raise InvalidPairError(f"copied_teacher_layers must be strictly increasing, got {list(copied)}")
    if copied[0] != 0 or copied[-1] >= num_teacher_layers:
        raise InvalidPairError(
            f"copied_teacher_layers {list(copied)} must start at 0 and stay below the teacher's "
            f"{num_teacher_layers} layers")
    layout = StudentLayout(num_teacher_layers, copied)
    pruned = config.get("pruned_teacher_layers")
    if pruned is not None and tuple(int(i) for i in pruned) != layout.pruned_teacher_layers:
        raise InvalidPairError(
            f"pruned_teacher_layers {list(pruned)} is not the complement of copied_teacher_layers "
            f"for a {num_teacher_layers}-layer teacher")
    return layout


@dataclass(frozen=True)
class LayerRef:
    """One decoder layer of a variant: the model it comes from and its index there."""

    source: str
    index: int


@dataclass(frozen=True)
class VariantPlan:
    """Everything a variant is made of; `patched_blocks` is k in the paper."""

    num_layers: int
    patched_blocks: int
    layers: tuple[LayerRef, ...]
    embed: str
    norm: str
    head: str
    rotary: str

    @property
    def is_teacher(self) -> bool:
        return all(ref.source == TEACHER for ref in self.layers) and self.embed == self.head == TEACHER

    @property
    def is_student(self) -> bool:
        return all(ref.source == STUDENT for ref in self.layers) and self.embed == self.head == STUDENT


def _whole(source: str, num_layers: int, patched_blocks: int) -> VariantPlan:
    layers = tuple(LayerRef(source, i) for i in range(num_layers))
    return VariantPlan(num_layers, patched_blocks, layers, source, source, source, source)


def _multi_layer_blocks(layout: StudentLayout) -> list[int]:
    """Student indices whose block holds two or more teacher layers (patching them changes the size)."""
    return [i for i, block in enumerate(layout.blocks) if len(block) > 1]


def patch_sequence(layout: StudentLayout, order: Order | str | Sequence[int]) -> tuple[int, ...]:
    """The multi-layer blocks (student indices) in the order they are patched back.

    `order` is "last" (back to front), "first" (front to back) or an explicit sequence, for example a
    calibrated one; a sequence must name every multi-layer block exactly once.
    """
    multi = _multi_layer_blocks(layout)
    order = parse_order(order)
    if isinstance(order, PatchOrder):
        return tuple(reversed(multi)) if order is PatchOrder.LAST_TO_FIRST else tuple(multi)
    sequence = order
    if sorted(sequence) != multi:
        raise InvalidPairError(
            f"patch order {list(sequence)} must list each multi-layer block {multi} exactly once", param="order")
    return sequence


def patched_set(layout: StudentLayout, order: Order | str | Sequence[int], k: int) -> frozenset[int]:
    """Student layers replaced by their teacher blocks after k patches.

    "last" also patches the single-layer blocks behind the cut (the teacher's own tail and head);
    "first" those in front of it (the teacher's embedding); an explicit order patches only what it names.
    """
    order = parse_order(order)
    sequence = patch_sequence(layout, order)
    if k == 0:
        return frozenset()
    if order is PatchOrder.LAST_TO_FIRST:
        return frozenset(range(sequence[k - 1], layout.num_student_layers))
    if order is PatchOrder.FIRST_TO_LAST:
        return frozenset(range(sequence[k - 1] + 1))
    return frozenset(sequence[:k])


def plan_from_patched(layout: StudentLayout, patched: frozenset[int], k: int) -> VariantPlan:
    """Each student layer in `patched` replaced by its teacher block; the ends follow the end blocks."""
    layers: list[LayerRef] = []
    for i, block in enumerate(layout.blocks):
        layers += [LayerRef(TEACHER, t) for t in block] if i in patched else [LayerRef(STUDENT, i)]
    embed = TEACHER if 0 in patched else STUDENT
    tail = TEACHER if layout.num_student_layers - 1 in patched else STUDENT  # final norm, head and rotary
    return VariantPlan(len(layers), k, tuple(layers), embed=embed, norm=tail, head=tail, rotary=tail)


def plan_variant(layout: StudentLayout, order: Order | str | Sequence[int], k: int) -> VariantPlan:
    """The variant with `k` multi-layer blocks patched back (k=0: student, k=max: teacher)."""
    multi = _multi_layer_blocks(layout)
    if not 0 <= k <= len(multi):
        raise InvalidPairError(f"k={k} is outside 0..{len(multi)} for this student", param="k")
    if k == 0:
        return _whole(STUDENT, layout.num_student_layers, 0)
    if k == len(multi):
        return _whole(TEACHER, layout.num_teacher_layers, k)
    return plan_from_patched(layout, patched_set(layout, order, k), k)


def plan_family(layout: StudentLayout, order: Order | str | Sequence[int]) -> dict[int, VariantPlan]:
    """Every reachable layer count mapped to its plan, smallest first."""
    plans = [plan_variant(layout, order, k) for k in range(len(_multi_layer_blocks(layout)) + 1)]
    return {plan.num_layers: plan for plan in plans}


def block_choices(layout: StudentLayout, plan: VariantPlan) -> tuple[bool, ...]:
    """Per student block, whether the plan runs the teacher's layers for it (patched) or the student's layer.

    Every plan walks the student's blocks in order, which is what lets sizes share a decode batch.
    """
    choices, position = [], 0
    for index, block in enumerate(layout.blocks):
        if plan.layers[position] == LayerRef(STUDENT, index):
            choices.append(False)
            position += 1
        elif plan.layers[position:position + len(block)] == tuple(LayerRef(TEACHER, t) for t in block):
            choices.append(True)
            position += len(block)
        else:
            raise AssertionError(f"plan of {plan.num_layers} layers does not follow the student's blocks")
    assert position == len(plan.layers), "plan has layers beyond the student's blocks"
    return tuple(choices)
