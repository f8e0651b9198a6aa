"""Modules from baseline recipes: the teacher's own layers referenced, merged layers built one at a time."""

from __future__ import annotations

import copy

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


def build_model(family: Family, recipe: Recipe, template: nn.Module | None = None) -> nn.Module:
    """The pruned teacher for a recipe: referenced layers are the teacher's modules, merged ones are new."""
    teacher_layers = get_path(family.teacher, family.spec.layers)
    layers = [teacher_layers[terms[0][0]] if is_referenced(terms) else merged_layer(teacher_layers, terms)
              for terms in recipe]
    return assemble_layers(family.teacher, layers, [base_layer(terms) for terms in recipe], family.spec,
                           template)
