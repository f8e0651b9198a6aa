"""LaCo's layer-collapse search (Yang et al. 2024, Algorithm 1), on recipes: pure, the similarity is given.

From the top of the model down, try merging layer l with the C - 1 layers above it (RDSC, `plans.merge`);
keep the merge when the merged model's final hidden states stay at least T cosine-similar to the teacher's on
a few calibration samples, then step down I layers, else step down one; stop at the lowest layer L. Here the
search also stops once the target size is reached, merging fewer layers when C - 1 would pass it. If the
sweep ends above the target, merges are taken greedily by best similarity below T and counted as fallbacks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from services.eval.baselines.plans import Recipe, identity_recipe, merge, merge_positions, merge_size


@dataclass(frozen=True)
class LacoSettings:
    combined: int = 4  # C: layers collapsed into one by a merge
    lowest: int = 1  # L: merges start no lower (the first layer stays itself)
    interval: int = 2  # I: layers stepped down after an accepted merge
    threshold: float = 0.65  # T: least mean cosine similarity to the teacher's final hidden states
    samples: int = 4  # calibration windows the similarity is measured on
    sample_tokens: int = 64  # tokens of each of those windows


@dataclass(frozen=True)
class LacoResult:
    recipe: Recipe
    accepted: int  # merges that met the threshold
    fallbacks: int  # merges taken below the threshold, the best available


def laco_search(num_teacher_layers: int, num_layers: int, similarity: Callable[[Recipe], float],
                settings: LacoSettings = LacoSettings()) -> LacoResult:
    recipe = identity_recipe(range(num_teacher_layers))
    position, accepted = num_teacher_layers, 0
    while len(recipe) > num_layers:
        following = merge_size(recipe, num_layers, settings.combined)
        position = min(position, len(recipe) - following - 1)  # the top group first
        if position < settings.lowest:
            break
        candidate = merge(recipe, position, following)
        if similarity(candidate) >= settings.threshold:
            recipe, accepted, position = candidate, accepted + 1, position - settings.interval
        else:
            position -= 1
    fallbacks = 0
    while len(recipe) > num_layers:
        following = merge_size(recipe, num_layers, settings.combined)
        candidates = [merge(recipe, p, following) for p in merge_positions(recipe, following, settings.lowest)]
        recipe, fallbacks = max(candidates, key=similarity), fallbacks + 1
    return LacoResult(recipe, accepted, fallbacks)
