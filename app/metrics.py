"""Prometheus metrics, labelled by size: requests, tokens, time to first token, time per output token."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

MEMORY_GAUGES = {"kv_reserved_bytes": "KV cache bytes the engine holds for batches (in use or kept for reuse)",
                 "kv_in_use_bytes": "KV cache bytes held by running batches",
                 "weights_bytes": "Bytes of the teacher's and the student's distinct tensors",
                 "memory_bound_bytes": "Most the limits let the server hold: weights, KV and one prefill or scoring"}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """One registry per app, so several apps (tests, replicas in one process) never collide."""

    def __init__(self, stats: Callable[[], dict] | None = None):
        self.registry = CollectorRegistry()
        self.requests = Counter("boomerang_requests", "Requests served", ["model", "endpoint", "status"],
                                registry=self.registry)
        self.tokens = Counter("boomerang_tokens", "Tokens processed", ["model", "kind"], registry=self.registry)
        self.ttft = Histogram("boomerang_time_to_first_token_seconds", "Time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("boomerang_time_per_output_token_seconds", "Time per output token after the first",
                              ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("boomerang_batch_size", "Sequences per batch (model: its layer count, or "
                                    "'mixed' for a batch of several sizes)", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
        self.size_choices = Counter("boomerang_size_choices", "Sizes served to requests that let the server "
                                    "choose (auto, allow_smaller), by the largest allowed and the one served",
                                    ["requested", "served"], registry=self.registry)
        self.queue_depth = Gauge("boomerang_queue_depth", "Requests waiting for a slot", registry=self.registry)
        self.running = Gauge("boomerang_running", "Sequences decoding now (rows of the running batches)",
                             registry=self.registry)
        self.memory = {key: Gauge(f"boomerang_{key}", help_text, registry=self.registry)
                       for key, help_text in MEMORY_GAUGES.items()}
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes and friends
        self.stats = stats

    def render(self) -> bytes:
        if self.stats is not None:
            stats = self.stats()
            self.queue_depth.set(stats.get("waiting", 0))
            self.running.set(stats.get("running", 0))
            for key, gauge in self.memory.items():
                gauge.set(stats.get(key, 0))
        return generate_latest(self.registry)

    def count(self, endpoint: str, model: str, status: str = "ok", prompt_tokens: int = 0,
              completion_tokens: int = 0) -> None:
        self.requests.labels(model, endpoint, status).inc()
        self.tokens.labels(model, "prompt").inc(prompt_tokens)
        self.tokens.labels(model, "completion").inc(completion_tokens)

    async def observe_stream(self, stream: AsyncIterator, model: str, endpoint: str) -> AsyncIterator:
        """Pass deltas through, timing the first token and the ones after it."""
        start = last = time.perf_counter()
        first, tokens, prompt_tokens, status = True, 0, 0, "ok"
        try:
            async for delta in stream:
                now = time.perf_counter()
                if delta.token_ids:
                    if first:
                        self.ttft.labels(model).observe(now - start)
                        first = False
                    else:
                        self.tpot.labels(model).observe(now - last)
                    last = now
                tokens, prompt_tokens = delta.completion_tokens, delta.prompt_tokens
                yield delta
        except BaseException:
            status = "error"
            raise
        finally:
            await stream.aclose()
            self.count(endpoint, model, status, prompt_tokens, tokens)
