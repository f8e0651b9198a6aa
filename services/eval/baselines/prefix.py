"""Recipes run on fixed inputs from the deepest hidden state they share with a recipe run before.

Baselines at neighbouring sizes, and LaCo's candidates, keep the same bottom layers: a shared prefix of layers
runs once. Exact: the first layer after the prefix is handed the very tensor it would have computed (by a hook
on its input), on the same batches; the embedding still runs and is discarded (cheap).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from services.eval.baselines.build import MergedLayers, build_model
from services.eval.baselines.plans import Recipe
from services.family import Family
from services.family.architectures import get_path

STATE_BUDGET = 512 * 2**20  # bytes of cached hidden states per runner


def _hidden_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@contextmanager
def _layer_inputs(layers: nn.ModuleList, start: torch.Tensor | None, captured: dict[int, torch.Tensor]):
    """Replaces the first layer's input with `start` (when given) and records every later layer's input."""

    def replace(_, args, kwargs):
        if args:
            return (start, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": start}

    def record(index):
        def hook(_, args, kwargs):
            captured[index] = _hidden_input(args, kwargs)  # [b, seq, hidden]
        return hook

    handles = [layers[0].register_forward_pre_hook(replace, with_kwargs=True)] if start is not None else []
    handles += [layers[i].register_forward_pre_hook(record(i), with_kwargs=True) for i in range(1, len(layers))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class PrefixRunner:
    """Runs recipes of one family's teacher on fixed batches, reusing the hidden states of shared prefixes."""

    def __init__(self, family: Family, batches: list[torch.Tensor], template: nn.Module | None = None,
                 merged: MergedLayers | None = None):
        self.family, self.batches, self.template, self.merged = family, batches, template, merged
        self.states: OrderedDict[Recipe, list[torch.Tensor]] = OrderedDict()  # prefix -> next layer's input
        hidden = family.teacher.config.hidden_size * family.teacher.dtype.itemsize
        self.capacity = max(1, STATE_BUDGET // (hidden * sum(b.numel() for b in batches)))

    def run(self, recipe: Recipe, read: Callable, **forward) -> list:
        """`read(output, batch)` of each batch's forward through the recipe's model."""
        start = self._deepest(recipe)
        model = build_model(self.family, recipe[start:], self.template, self.merged)
        layers = get_path(model, self.family.spec.layers)
        results, captured = [], [{} for _ in self.batches]
        with torch.inference_mode():
            for b, batch in enumerate(self.batches):  # [b, seq]
                begin = self.states[recipe[:start]][b] if start else None
                with _layer_inputs(layers, begin, captured[b]):
                    results.append(read(model(batch, use_cache=False, **forward), batch))
        for index in range(1, len(layers)):
            self._keep(recipe[: start + index], [states[index] for states in captured])
        return results

    def _deepest(self, recipe: Recipe) -> int:
        """The most layers of `recipe` whose output is cached (never all: the norm and head must run)."""
        for length in range(len(recipe) - 1, 0, -1):
            if recipe[:length] in self.states:
                self.states.move_to_end(recipe[:length])
                return length
        return 0

    def _keep(self, prefix: Recipe, states: list[torch.Tensor]) -> None:
        self.states[prefix] = states
        self.states.move_to_end(prefix)
        while len(self.states) > self.capacity:
            self.states.popitem(last=False)
