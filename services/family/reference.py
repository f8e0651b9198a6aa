"""The slow, obvious way to build a variant: deep copies, as the paper's patching code does.

Used as the numerical reference in tests and as the baseline in benchmarks; never used to serve.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from services.family.architectures import get_path, number_layers, set_path, spec_for


def _patched(copied: list[int], num_teacher_layers: int, k: int, order) -> set[int]:
    """Student layers replaced by teacher blocks after k patches, spelled out without `services.family.plan`."""
    ends = copied[1:] + [num_teacher_layers]
    multi = [i for i, (start, end) in enumerate(zip(copied, ends)) if end - start > 1]
    if order == "last":
        return set(range(multi[-k], len(copied)))
    if order == "first":
        return set(range(multi[k - 1] + 1))
    return set(order[:k])


def build_reference(teacher: nn.Module, student: nn.Module, copied: list[int], k: int,
                    order: str | Sequence[int] = "last") -> nn.Module:
    """A standalone deep-copied model with k multi-layer blocks patched (k=0: student, all: teacher).

    `order` is "last", "first" or the student indices of the multi-layer blocks in patch order.
    """
    spec = spec_for(teacher.config.model_type)
    n_teacher = teacher.config.num_hidden_layers
    ends = copied[1:] + [n_teacher]
    num_multi = sum(1 for s, e in zip(copied, ends) if e - s > 1)
    if k in (0, num_multi):
        model = copy.deepcopy(student if k == 0 else teacher)
        number_layers(model, spec.layers)  # the originals may carry a family's shared-cache slots
        return model.eval()
    patched = _patched(copied, n_teacher, k, order)
    t_layers, s_layers = get_path(teacher, spec.layers), get_path(student, spec.layers)
    layers, types = [], []
    for i, (start, end) in enumerate(zip(copied, ends)):
        if i in patched:
            layers += [copy.deepcopy(t_layers[t]) for t in range(start, end)]
            types += _types(teacher, range(start, end))
        else:
            layers.append(copy.deepcopy(s_layers[i]))
            types += _types(student, [i])
    model = copy.deepcopy(teacher if len(copied) - 1 in patched else student)  # final norm and head
    set_path(model, spec.embed, copy.deepcopy(get_path(teacher if 0 in patched else student, spec.embed)))
    set_path(model, spec.layers, nn.ModuleList(layers))
    model.config.num_hidden_layers = len(layers)
    if None not in types:
        model.config.layer_types = types
    number_layers(model, spec.layers)
    return model.eval()


def _types(model: nn.Module, indices) -> list[str | None]:
    layer_types = getattr(model.config, "layer_types", None)
    return [None if layer_types is None else layer_types[i] for i in indices]
