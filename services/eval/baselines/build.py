"""Modules from baseline recipes: the teacher's own layers referenced, merged layers built on demand."""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from services.eval.baselines.plans import Recipe, Terms, base_layer, is_referenced
from services.family import Family
from services.family.architectures import get_path
from services.family.assembly import assemble_layers


@torch.no_grad()
def merged_layer(teacher_layers: nn.ModuleList, terms: Terms) -> nn.Module:
    """A new layer whose every parameter is Σ coefficient · the teacher layers' same parameter (summed in fp32)."""
    layer = copy.deepcopy(teacher_layers[base_layer(terms)])  # its class, buffers and KV slot
    for name, param in layer.named_parameters():
        total = sum(c * teacher_layers[i].get_parameter(name).float() for i, c in terms)  # [*param.shape]
        param.copy_(total.to(param.dtype))
    return layer


class MergedLayers:
    """The last `size` merged layers built, by their terms: neighbouring sizes and LaCo's candidates share most
    of their merges, and building one costs more than running it on a few windows."""

    def __init__(self, size: int = 16):
        self.size, self.layers = size, OrderedDict()

    def get(self, teacher_layers: nn.ModuleList, terms: Terms) -> nn.Module:
        if terms in self.layers:
            self.layers.move_to_end(terms)
        else:
            self.layers[terms] = merged_layer(teacher_layers, terms)
            if len(self.layers) > self.size:
                self.layers.popitem(last=False)
        return self.layers[terms]


def build_model(family: Family, recipe: Recipe, template: nn.Module | None = None,
                merged: MergedLayers | None = None) -> nn.Module:
    """The pruned teacher for a recipe: referenced layers are the teacher's modules, merged ones are new (or
    taken from `merged`)."""
    teacher_layers = get_path(family.teacher, family.spec.layers)
    build = merged.get if merged is not None else merged_layer
    layers = [teacher_layers[terms[0][0]] if is_referenced(terms) else build(teacher_layers, terms)
              for terms in recipe]
    return assemble_layers(family.teacher, layers, [base_layer(terms) for terms in recipe], family.spec,
                           template)
