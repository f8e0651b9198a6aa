"""Family-aware distillation: each micro-step also distils one patched variant, a model the server will serve.

The paper trains only the student and relies on alignment for the patched sizes to work. Here a variant
with k teacher blocks patched back (k drawn per micro-step, from the pair's patch order) is assembled from
the very same modules, run, and pulled toward the teacher with KL; gradients reach only the student's layers
it contains (the teacher is frozen). Cost: one more forward/backward through a model of 17..29 layers.
"""

from __future__ import annotations

import torch
from torch import nn

from services.family.architectures import spec_for
from services.family.assembly import assemble_variant, make_template
from services.family.plan import StudentLayout, VariantPlan, plan_family


class PatchedVariants:
    """The family's strictly intermediate sizes, drawn reproducibly by sample index."""

    def __init__(self, teacher: nn.Module, student: nn.Module, layout: StudentLayout, order, seed: int):
        self.teacher, self.student = teacher, student
        self.spec = spec_for(teacher.config.model_type)
        self.template = make_template(teacher, student)
        self.plans: list[VariantPlan] = list(plan_family(layout, order).values())[1:-1]  # not student, teacher
        self.seed = seed

    def sample(self, index: int) -> nn.Module:
        """The variant for micro-batch `index` (the same index gives the same size, so resume is exact)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        plan = self.plans[int(torch.randint(len(self.plans), (1,), generator=generator))]
        return assemble_variant(plan, self.teacher, self.student, self.spec, self.template)
