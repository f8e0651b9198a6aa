"""A calibrated patch order: greedily patch back, at each size, the block that costs the least.

The paper patches from one end (last-to-first, or first-to-last for Llama) and asks whether an
importance-based order does better. This searches it on calibration text that is neither training nor
evaluation text: k steps, each trying every unpatched multi-layer block, 0.5·B·(B+1) forward passes
for B blocks (105 for SmolLM2's 14).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.eval.curve import perplexity
from services.family import Family
from services.family.plan import patch_sequence, plan_from_patched


@dataclass(frozen=True)
class CalibrationStep:
    num_layers: int
    patched_block: int
    perplexity: float
    candidates: dict[int, float]  # every block tried at this step -> calibration perplexity


def calibrate_order(family: Family, chunks: torch.Tensor, progress: bool = True) -> list[CalibrationStep]:
    """Greedy search; the patched blocks, in order, are `[step.patched_block for step in steps]`."""
    from tqdm import tqdm

    remaining = list(patch_sequence(family.layout, "first"))
    chosen: list[int] = []
    steps = []
    bar = tqdm(total=len(remaining) * (len(remaining) + 1) // 2, desc="calibrating", unit="pass",
               disable=not progress)
    while remaining:
        plans = {block: plan_from_patched(family.layout, frozenset(chosen + [block]), len(chosen) + 1)
                 for block in remaining}
        candidates = {}
        for block, plan in plans.items():
            candidates[block] = perplexity(family.assemble(plan), chunks)
            bar.update(1)
        best = min(candidates, key=candidates.__getitem__)
        chosen.append(best)
        remaining.remove(best)
        steps.append(CalibrationStep(plans[best].num_layers, best, candidates[best], candidates))
    bar.close()
    return steps
