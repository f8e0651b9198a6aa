"""Which size serves a request: the one asked for, or, for `auto` (and for `allow_smaller` under the degrade
policy), the largest whose predicted latency fits the request's budget or the server's latency target."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from app.schemas import SamplingFields
from app.settings import Settings
from services.engine.interface import Engine, StreamDelta
from services.engine.latency import Budget, LatencyModel, Load, Observation, choose_size
from services.errors import InvalidRequestError

AUTO = "auto"
log = logging.getLogger("boomerang.sizes")


@dataclass(frozen=True)
class Requested:
    largest: int  # the size asked for, or the largest `auto` may pick
    may_shrink: bool


def requested_size(engine: Engine, req: SamplingFields, settings: Settings) -> Requested:
    """`"model": "<family>-auto"` or `"num_layers": "auto"` let the server choose, up to the size the model
    names (the teacher by default); `allow_smaller` lets it shrink an explicit size under the degrade policy."""
    auto_id = f"{engine.family_name}-{AUTO}"
    auto = req.num_layers == AUTO or req.model == auto_id
    model = None if req.model == auto_id else req.model
    largest = engine.resolve_size(model, None if req.num_layers == AUTO else req.num_layers)
    if req.min_num_layers is not None and req.min_num_layers > largest:
        raise InvalidRequestError(f"min_num_layers ({req.min_num_layers}) is above the largest size allowed "
                                  f"({largest})", param="min_num_layers")
    return Requested(largest, auto or (req.allow_smaller and settings.overload_policy == "degrade"))


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def budget_of(req: SamplingFields, settings: Settings) -> Budget:
    """The request's own limits, else the server's latency target."""
    budget = Budget(_seconds(req.max_latency_ms), _seconds(req.max_time_to_first_token_ms), req.min_num_layers)
    if not budget.limited and settings.latency_target_ms is not None:
        budget = Budget(_seconds(settings.latency_target_ms), None, req.min_num_layers)
    return budget


def choose(requested: Requested, req: SamplingFields, settings: Settings, latency: LatencyModel, sizes: list[int],
           stats: dict, prompt_tokens: int, max_tokens: int | None) -> int:
    budget = budget_of(req, settings)
    if not requested.may_shrink or not budget.limited:
        return requested.largest
    load = Load.from_stats(stats, latency.arrivals_per_s())
    size, predicted = choose_size(latency, sizes, requested.largest, budget, prompt_tokens, max_tokens, load)
    log.info("size chosen: %d of up to %d layers, predicted %.2f s (first token %.2f s), %d running, %d waiting",
             size, requested.largest, predicted.total_s, predicted.time_to_first_token_s, load.running, load.waiting)
    return size


async def observed(stream: AsyncIterator[StreamDelta], latency: LatencyModel, num_layers: int,
                   queued: bool) -> AsyncIterator[StreamDelta]:
    """Pass deltas through; a sequence that finishes teaches the latency model what it cost."""
    start, first = time.perf_counter(), None
    async for delta in stream:
        if first is None and delta.token_ids:
            first = time.perf_counter() - start
        if delta.finish_reason is not None and first is not None:
            latency.observe(Observation(num_layers, delta.prompt_tokens, delta.completion_tokens, first,
                                        time.perf_counter() - start, queued))
        yield delta
