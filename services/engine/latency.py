"""Predicted latency per size, learned from the requests the server finishes, and the choice of a size for a
budget. Pure Python (no torch): the HTTP layer consults it before it hands a request to the engine.

Decode reads every weight of a size once per token, so a size's time per token is taken as proportional to
its bytes; prefill is arithmetic, so its time per prompt token is taken as proportional to its parameters.
One rate of each kind, learned from every size served, predicts all of them: a size never asked for yet is
predicted from the others; before the first request, decode starts from the model card's recorded speed.
Queueing is added from the engine's counts of running and waiting sequences.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from services.engine.interface import ModelCard

SMOOTHING = 0.2  # weight of the newest observation in each running average
PRIOR_SECONDS_PER_BYTE = 1 / 20e9  # until a request is observed: a modest memory bandwidth
PRIOR_SECONDS_PER_PARAM_TOKEN = 2 / 50e9  # two operations per parameter and token at a modest rate
PRIOR_COMPLETION_TOKENS = 128.0  # expected answer length where a request sets no max_tokens
RECORDED_SPEED = "decode_tokens_per_s_cpu"  # the model card's measure, where a pair has one


@dataclass(frozen=True)
class Observation:
    """One finished request, as its client saw it."""

    num_layers: int
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float
    total_s: float
    queued: bool = False  # it waited for a slot: its first token measures the queue, not the prefill


@dataclass(frozen=True)
class Prediction:
    time_to_first_token_s: float
    total_s: float


@dataclass(frozen=True)
class Budget:
    """What a request allows: latency limits in seconds (None: none) and the smallest size it accepts."""

    max_latency_s: float | None = None
    max_time_to_first_token_s: float | None = None
    min_num_layers: int | None = None

    def fits(self, prediction: Prediction) -> bool:
        return ((self.max_latency_s is None or prediction.total_s <= self.max_latency_s) and
                (self.max_time_to_first_token_s is None
                 or prediction.time_to_first_token_s <= self.max_time_to_first_token_s))

    @property
    def limited(self) -> bool:
        return self.max_latency_s is not None or self.max_time_to_first_token_s is not None


def _recorded_seconds_per_byte(cards: list[ModelCard]) -> float | None:
    """The model card's decode speed per size, where the pair records one, as the first estimate."""
    rates = sorted(1 / (card.quality[RECORDED_SPEED] * card.bytes) for card in cards
                   if card.quality.get(RECORDED_SPEED))
    return rates[len(rates) // 2] if rates else None


def _blend(old: float, new: float) -> float:
    return (1 - SMOOTHING) * old + SMOOTHING * new


class LatencyModel:
    """Running averages of decode seconds per byte, prefill seconds per parameter and prompt token, request
    duration and answer length; thread-safe."""

    def __init__(self, cards: list[ModelCard], max_concurrent: int):
        self.cards = {card.num_layers: card for card in cards}
        self.max_concurrent = max_concurrent
        self.seconds_per_byte = _recorded_seconds_per_byte(cards) or PRIOR_SECONDS_PER_BYTE
        self.seconds_per_param_token = PRIOR_SECONDS_PER_PARAM_TOKEN
        self.completion_tokens = PRIOR_COMPLETION_TOKENS
        self.request_s: float | None = None
        self._lock = threading.Lock()

    def observe(self, obs: Observation) -> None:
        card = self.cards[obs.num_layers]
        with self._lock:
            if obs.completion_tokens > 1 and obs.total_s > obs.time_to_first_token_s:
                per_token = (obs.total_s - obs.time_to_first_token_s) / (obs.completion_tokens - 1)
                self.seconds_per_byte = _blend(self.seconds_per_byte, per_token / card.bytes)
            if obs.prompt_tokens and not obs.queued:
                per_param_token = obs.time_to_first_token_s / (obs.prompt_tokens * card.parameters)
                self.seconds_per_param_token = _blend(self.seconds_per_param_token, per_param_token)
            self.completion_tokens = _blend(self.completion_tokens, obs.completion_tokens)
            # a slot is held for the prefill and the decode; the wait before it is the queue's, counted apart
            service_s = obs.total_s - obs.time_to_first_token_s + self.prefill_s(obs.num_layers, obs.prompt_tokens)
            self.request_s = service_s if self.request_s is None else _blend(self.request_s, service_s)

    def token_s(self, num_layers: int) -> float:
        return self.seconds_per_byte * self.cards[num_layers].bytes

    def prefill_s(self, num_layers: int, prompt_tokens: int) -> float:
        return self.seconds_per_param_token * self.cards[num_layers].parameters * prompt_tokens

    def queue_s(self, running: int, waiting: int) -> float:
        """Expected wait for a slot: the requests ahead beyond the free slots, each a slot's average request."""
        ahead = running + waiting - self.max_concurrent + 1
        if ahead <= 0 or self.request_s is None:
            return 0.0
        return ahead * self.request_s / self.max_concurrent

    def predict(self, num_layers: int, prompt_tokens: int, max_tokens: int | None, running: int = 0,
                waiting: int = 0) -> Prediction:
        tokens = self.completion_tokens if max_tokens is None else max_tokens
        first = self.queue_s(running, waiting) + self.prefill_s(num_layers, prompt_tokens)
        return Prediction(first, first + max(0.0, tokens - 1) * self.token_s(num_layers))

    def speed(self, num_layers: int) -> dict:
        """Current estimates for `/v1/models`."""
        return {"decode_tokens_per_s": round(1 / self.token_s(num_layers), 2),
                "prefill_tokens_per_s": round(1 / self.prefill_s(num_layers, 1), 2)}


def choose_size(model: LatencyModel, sizes: list[int], largest: int, budget: Budget, prompt_tokens: int,
                max_tokens: int | None, running: int, waiting: int) -> int:
    """The largest size up to `largest`, never below the floor, whose predicted latency fits the budget; the
    smallest allowed where none fits."""
    floor = budget.min_num_layers or min(sizes)
    allowed = sorted((n for n in sizes if floor <= n <= largest), reverse=True)
    if not allowed:
        return largest
    for n in allowed:
        if budget.fits(model.predict(n, prompt_tokens, max_tokens, running, waiting)):
            return n
    return allowed[-1]
