"""Predicted latency per size, learned from the requests the server finishes, and the choice of a size for a
budget. Pure Python (no torch): the HTTP layer consults it before it hands a request to the engine.

Decode reads every weight of a size once per token, so a size's time per token is taken as proportional to
its bytes; prefill is arithmetic, so its time per prompt token is taken as proportional to its parameters.
One rate of each kind, learned from every size served, predicts all of them: a size never asked for yet is
predicted from the others; before the first request, decode starts from the model card's recorded speed.
Under load a request shares its steps with the rows running and waiting now, and each newcomer's prefill
pauses them: its time per token is predicted from the engine's own fit of step times (`step_times`) at the
batch it will join, stretched by the prefill work arriving per second (requests arriving times the engine's
own prefill time of an average prompt: a first token's latency also holds the waits for a step, so it would
overstate that work); queueing is added from the engine's counts of running and waiting sequences. Until the
fit is trusted, the time per token is the running average.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass

from services.engine.interface import ModelCard
from services.engine.step_times import StepModel

SMOOTHING = 0.2  # weight of the newest observation in each running average
PRIOR_SECONDS_PER_BYTE = 1 / 20e9  # until a request is observed: a modest memory bandwidth
PRIOR_SECONDS_PER_PARAM_TOKEN = 2 / 50e9  # two operations per parameter and token at a modest rate
PRIOR_COMPLETION_TOKENS = 128.0  # expected answer length where a request sets no max_tokens
PRIOR_PROMPT_TOKENS = 64.0  # expected prompt length until requests are observed
RECORDED_SPEED = "decode_tokens_per_s_cpu"  # the model card's measure, where a pair has one
ARRIVAL_WINDOW_S = 10.0  # the arrival rate is counted over this many seconds
MAX_PREFILL_SHARE = 0.8  # prefills arriving faster than this share of the time: the stretch stops growing


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
class Load:
    """What the server carries as a request arrives: the engine's counts, the size of every running row, its
    fit of step times and its prefill rate (None until trusted) and the arrival rate of requests."""

    running: int = 0
    waiting: int = 0
    running_layers: tuple[int, ...] = ()
    step_model: StepModel | None = None
    arrivals_per_s: float = 0.0
    prefill_s_per_layer_token: float | None = None

    @classmethod
    def from_stats(cls, stats: dict, arrivals_per_s: float = 0.0) -> Load:
        return cls(stats.get("running", 0), stats.get("waiting", 0), tuple(stats.get("running_layers", ())),
                   stats.get("step_model"), arrivals_per_s, stats.get("prefill_s_per_layer_token"))


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
        self.prompt_tokens = PRIOR_PROMPT_TOKENS
        self.request_s: float | None = None
        self._arrivals: deque[float] = deque()
        self._lock = threading.Lock()

    def arrive(self, now: float | None = None) -> None:
        """A request arrived (whatever size it asks for): it counts in the arrival rate."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self._arrivals.append(now)
            while self._arrivals and self._arrivals[0] < now - ARRIVAL_WINDOW_S:
                self._arrivals.popleft()

    def arrivals_per_s(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._lock:
            recent = [t for t in self._arrivals if t >= now - ARRIVAL_WINDOW_S]
        return len(recent) / ARRIVAL_WINDOW_S

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
            self.prompt_tokens = _blend(self.prompt_tokens, obs.prompt_tokens)
            # a slot is held for the prefill and the decode; the wait before it is the queue's, counted apart
            service_s = obs.total_s - obs.time_to_first_token_s + self.prefill_s(obs.num_layers, obs.prompt_tokens)
            self.request_s = service_s if self.request_s is None else _blend(self.request_s, service_s)

    def token_s(self, num_layers: int) -> float:
        return self.seconds_per_byte * self.cards[num_layers].bytes

    def prefill_s(self, num_layers: int, prompt_tokens: int) -> float:
        return self.seconds_per_param_token * self.cards[num_layers].parameters * prompt_tokens

    def _prefill_stretch(self, load: Load, num_layers: int) -> float:
        """How much the prefills of newcomers stretch a running request's decode: 1 / (1 - their share)."""
        tokens = round(self.prompt_tokens)
        per_request = (self.prefill_s(num_layers, tokens) if load.prefill_s_per_layer_token is None
                       else load.prefill_s_per_layer_token * tokens * num_layers)
        share = load.arrivals_per_s * per_request
        return 1 / (1 - min(share, MAX_PREFILL_SHARE))

    def token_s_at(self, num_layers: int, load: Load) -> float:
        """Seconds per token of a size joining the batch `load` describes."""
        if load.step_model is None:
            return self.token_s(num_layers)
        others = min(self.max_concurrent - 1, load.running + load.waiting)
        mean_layers = statistics.fmean(load.running_layers) if load.running_layers else num_layers
        largest = max(num_layers, *load.running_layers) if load.running_layers else num_layers
        step = load.step_model.step_s(largest, num_layers + others * mean_layers)
        return step * self._prefill_stretch(load, round(mean_layers))

    def _slot_s(self, load: Load) -> float | None:
        """Seconds a slot is held by the average request when every slot is taken."""
        if load.step_model is None:
            return self.request_s
        layers = round(statistics.fmean(load.running_layers)) if load.running_layers else max(self.cards)
        full = Load(self.max_concurrent, 0, (layers,) * self.max_concurrent, load.step_model, load.arrivals_per_s,
                    load.prefill_s_per_layer_token)
        return (self.prefill_s(layers, round(self.prompt_tokens))
                + self.completion_tokens * self.token_s_at(layers, full))

    def queue_s(self, load: Load) -> float:
        """Expected wait for a slot: the requests ahead beyond the free slots, each a slot's average request."""
        ahead = load.running + load.waiting - self.max_concurrent + 1
        slot_s = self._slot_s(load)
        if ahead <= 0 or slot_s is None:
            return 0.0
        return ahead * slot_s / self.max_concurrent

    def predict(self, num_layers: int, prompt_tokens: int, max_tokens: int | None,
                load: Load = Load()) -> Prediction:
        tokens = self.completion_tokens if max_tokens is None else max_tokens
        first = self.queue_s(load) + self.prefill_s(num_layers, prompt_tokens)
        return Prediction(first, first + max(0.0, tokens - 1) * self.token_s_at(num_layers, load))

    def speed(self, num_layers: int) -> dict:
        """Current estimates for `/v1/models`."""
        return {"decode_tokens_per_s": round(1 / self.token_s(num_layers), 2),
                "prefill_tokens_per_s": round(1 / self.prefill_s(num_layers, 1), 2)}


def choose_size(model: LatencyModel, sizes: list[int], largest: int, budget: Budget, prompt_tokens: int,
                max_tokens: int | None, load: Load = Load()) -> tuple[int, Prediction]:
    """The largest size up to `largest`, never below the floor, whose predicted latency fits the budget; the
    smallest allowed where none fits. With its prediction."""
    floor = budget.min_num_layers or min(sizes)
    allowed = sorted((n for n in sizes if floor <= n <= largest), reverse=True) or [largest]
    for n in allowed:
        prediction = model.predict(n, prompt_tokens, max_tokens, load)
        if budget.fits(prediction):
            return n, prediction
    return allowed[-1], prediction
