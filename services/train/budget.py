"""`--max-minutes`: fit a run's step count to a wall-clock budget, timed on its own first steps."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# steps timed before the count is fixed (the first step, which warms caches and kernels up, is not timed)
TIMED_STEPS = 8


@dataclass
class TimeBudget:
    """Decides the total step count once: when the LR warm-up ends and enough steps are timed."""

    seconds: float
    warmup_steps: int
    cap: int | None = None  # --max-steps / --max-tokens, when given too
    ticks: list[float] = field(default_factory=list)  # monotonic time at the end of each step

    @property
    def fit_at_step(self) -> int:
        return max(self.warmup_steps, TIMED_STEPS + 1)

    def observe(self, step: int, now: float, started: float) -> int | None:
        """The total step count, returned once (at `fit_at_step`, or at the second step timed after a resume
        past it); None before. The caller drops the budget once it has the count."""
        self.ticks.append(now)
        if step < self.fit_at_step or len(self.ticks) < 2:
            return None
        step_seconds = (self.ticks[-1] - self.ticks[0]) / (len(self.ticks) - 1)
        more = math.floor(max(0.0, self.seconds - (now - started)) / step_seconds)
        total = step + more
        return total if self.cap is None else min(total, self.cap)
