"""The slow, obvious way to build a variant: deep copies, as the paper's patching code does.

Used as the numerical reference in tests and as the baseline in benchmarks; never used to serve.
"""

from __future__ import annotations

import copy

from torch import nn

from services.architectures import get_path, number_layers, set_path, spec_for


def _cutoffs(copied: list[int], num_teacher_layers: int, k: int, from_last: bool) -> tuple[int, int]:
    """(student cut, teacher cut) after patching k blocks of two or more teacher layers."""
    ends = copied[1:] + [num_teacher_layers]
    multi = [i for i, (start, end) in enumerate(zip(copied, ends)) if end - start > 1]
    if from_last:
        return multi[-k], copied[multi[-k]]
    return multi[k - 1] + 1, ends[multi[k - 1]]


def build_reference(teacher: nn.Module, student: nn.Module, copied: list[int], k: int,
                    from_last: bool = True) -> nn.Module:
    """A standalone deep-copied model with k multi-layer blocks patched (k=0: student, all: teacher)."""
    spec = spec_for(teacher.config.model_type)
    n_teacher = teacher.config.num_hidden_layers
    num_multi = sum(1 for s, e in zip(copied, copied[1:] + [n_teacher]) if e - s > 1)
    if k in (0, num_multi):
        model = copy.deepcopy(student if k == 0 else teacher)
        number_layers(model, spec.layers)  # the originals may carry a family's shared-cache slots
        return model.eval()
    s_cut, t_cut = _cutoffs(copied, n_teacher, k, from_last)
    t_layers, s_layers = get_path(teacher, spec.layers), get_path(student, spec.layers)
    model = copy.deepcopy(teacher if from_last else student)
    if from_last:
        layers = [copy.deepcopy(s_layers[i]) for i in range(s_cut)] + [copy.deepcopy(t_layers[i])
                                                                        for i in range(t_cut, n_teacher)]
        set_path(model, spec.embed, copy.deepcopy(get_path(student, spec.embed)))
        types = _types(student, range(s_cut)) + _types(teacher, range(t_cut, n_teacher))
    else:
        layers = [copy.deepcopy(t_layers[i]) for i in range(t_cut)] + [copy.deepcopy(s_layers[i])
                                                                        for i in range(s_cut, len(s_layers))]
        set_path(model, spec.embed, copy.deepcopy(get_path(teacher, spec.embed)))
        types = _types(teacher, range(t_cut)) + _types(student, range(s_cut, len(s_layers)))
    set_path(model, spec.layers, nn.ModuleList(layers))
    model.config.num_hidden_layers = len(layers)
    if None not in types:
        model.config.layer_types = types
    number_layers(model, spec.layers)
    return model.eval()


def _types(model: nn.Module, indices) -> list[str | None]:
    layer_types = getattr(model.config, "layer_types", None)
    return [None if layer_types is None else layer_types[i] for i in indices]
