"""How long a decode step takes for the rows it carries, and a prefill per prompt token, learned online from the
engine's own work. Pure Python (no torch): the engine feeds them, the latency model reads them through
`Engine.stats()`.

A step of a batch that mixes sizes reads the weights of its largest size once and computes every row through
its own layers, so its time is taken as `per_layer_s * largest + per_row_layer_s * sum(row layers)`: a weighted
least-squares fit of the two rates, the newest steps weighing most, so the fit follows the machine as it
warms, throttles or is shared.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

DECAY = 0.995  # weight left to a step after each newer one: the fit remembers a few hundred steps
MIN_STEPS = 32  # steps seen before the fit is trusted
MIN_SPREAD = 0.05  # the batch sizes seen must differ this much (relative) for the two rates to be told apart
PREFILL_DECAY = 0.9  # prefills are rarer than steps: the rate remembers a few dozen of them
MIN_PREFILLS = 4  # prefills seen before the rate is trusted


@dataclass(frozen=True)
class StepModel:
    """Seconds per decode step: `per_layer_s` per layer of the batch's largest size, plus `per_row_layer_s` per
    layer of each row."""

    per_layer_s: float
    per_row_layer_s: float

    def step_s(self, largest: int, row_layers: float) -> float:
        return self.per_layer_s * largest + self.per_row_layer_s * row_layers


class StepTimes:
    """Thread-safe running fit of `StepModel` from observed steps."""

    def __init__(self):
        self._sums = [0.0] * 5  # weighted sums of x1², x1·x2, x2², x1·y, x2·y
        self._steps = 0
        self._lock = threading.Lock()

    @property
    def steps(self) -> int:
        return self._steps

    def observe(self, row_layers: list[int], seconds: float) -> None:
        """One decode step: the layers of each row it advanced and its wall time."""
        if not row_layers or seconds <= 0:
            return
        x1, x2 = float(max(row_layers)), float(sum(row_layers))
        terms = (x1 * x1, x1 * x2, x2 * x2, x1 * seconds, x2 * seconds)
        with self._lock:
            self._sums = [DECAY * total + term for total, term in zip(self._sums, terms)]
            self._steps += 1

    def model(self) -> StepModel | None:
        """The fitted rates, or None until enough steps of different batch sizes were seen."""
        with self._lock:
            if self._steps < MIN_STEPS:
                return None
            s11, s12, s22, s1y, s2y = self._sums
        det = s11 * s22 - s12 * s12
        if det <= MIN_SPREAD * MIN_SPREAD * s11 * s22:  # every step carried the same rows: rates not separable
            return None
        per_layer = (s22 * s1y - s12 * s2y) / det
        per_row_layer = (s11 * s2y - s12 * s1y) / det
        if per_layer < 0 or per_row_layer < 0:  # noise on a narrow spread; a negative rate predicts nonsense
            return None
        return StepModel(per_layer, per_row_layer)


class PrefillRate:
    """Thread-safe running rate of the engine's prefills: seconds per prompt token and layer (each prompt's own
    tokens, so the padding of a batch of prompts is part of the rate)."""

    def __init__(self):
        self._seconds = self._layer_tokens = 0.0
        self._prefills = 0
        self._lock = threading.Lock()

    def observe(self, layer_tokens: int, seconds: float) -> None:
        """One prefill: the sum over its prompts of tokens times layers, and its wall time."""
        if layer_tokens <= 0 or seconds <= 0:
            return
        with self._lock:
            self._seconds = PREFILL_DECAY * self._seconds + seconds
            self._layer_tokens = PREFILL_DECAY * self._layer_tokens + layer_tokens
            self._prefills += 1

    def seconds_per_layer_token(self) -> float | None:
        """None until a few prefills were seen."""
        with self._lock:
            return self._seconds / self._layer_tokens if self._prefills >= MIN_PREFILLS else None
