"""LaCo (Yang et al. 2024) on a family's teacher: the similarity the search needs, measured by forwards."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from services.eval.baselines.build import MergedLayers
from services.eval.baselines.laco_search import LacoResult, LacoSettings, laco_search
from services.eval.baselines.plans import Recipe, identity_recipe
from services.eval.baselines.prefix import PrefixRunner
from services.family import Family

# the head on one position only: the similarity reads hidden states, and the head costs as much as many layers
HIDDEN_ONLY = {"output_hidden_states": True, "logits_to_keep": 1}


def _final_hidden(output, _batch) -> torch.Tensor:
    """The last entry of `hidden_states` (after the final norm, what the head reads): [b, seq, hidden]."""
    return output.hidden_states[-1].float()


@torch.inference_mode()
def final_hidden(model: nn.Module, samples: torch.Tensor) -> torch.Tensor:
    return _final_hidden(model(samples.to(next(model.parameters()).device), use_cache=False,
                               output_hidden_states=True), samples)


def similarity_to(family: Family, samples: torch.Tensor, template: nn.Module,
                  merged: MergedLayers | None = None) -> Callable[[Recipe], float]:
    """Mean per-token cosine similarity of a recipe's final hidden states to the teacher's, memoised by recipe
    (the searches for different sizes share their first merges); each candidate runs only the layers above
    the bottom it shares with a recipe run before (`PrefixRunner`)."""
    reference = final_hidden(family.teacher, samples)  # [b, seq, hidden]
    runner = PrefixRunner(family, [samples.to(family.device)], template, merged or MergedLayers())
    runner.run(identity_recipe(range(family.teacher.config.num_hidden_layers)), _final_hidden,
               **HIDDEN_ONLY)  # the teacher's states: every candidate's bottom
    seen: dict[Recipe, float] = {}

    def similarity(recipe: Recipe) -> float:
        if recipe not in seen:
            hidden = runner.run(recipe, _final_hidden, **HIDDEN_ONLY)[0]  # [b, seq, hidden]
            seen[recipe] = float(nn.functional.cosine_similarity(hidden, reference, dim=-1).mean())
        return seen[recipe]

    return similarity


def laco_recipes(family: Family, chunks: torch.Tensor, sizes: list[int], template: nn.Module,
                 settings: LacoSettings = LacoSettings(),
                 merged: MergedLayers | None = None) -> tuple[dict[int, LacoResult], dict[int, float]]:
    """Per size, the search's result and its similarity to the teacher."""
    samples = chunks[: settings.samples, : settings.sample_tokens]  # [samples, sample_tokens]
    similarity = similarity_to(family, samples, template, merged)
    total = family.teacher.config.num_hidden_layers
    results = {n: laco_search(total, n, similarity, settings) for n in sizes}
    return results, {n: similarity(r.recipe) for n, r in results.items()}
