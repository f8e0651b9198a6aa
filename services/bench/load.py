"""Open-loop load (`boomerang bench --load`): Poisson arrivals at multiples of the teacher's measured capacity,
one mix of prompt and answer lengths, three servers in turn: the teacher only with `reject` (today's queue), the
teacher only with an unbounded queue, and the elastic family (`auto` requests with a latency budget, served under
`--overload-policy degrade`). Every server gets the same arrivals; per load it reports goodput (requests finished
within the target per second), 429s, latency percentiles, the mean size served and the mean answer perplexity of
the sizes served (the model card's chat measure, weighted by requests).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass

import httpx

HEADER = "x-boomerang-num-layers"
WORDS = ("to", "be", "or", "not", "to", "be", "that", "is", "the", "question", "whether", "tis", "nobler", "in",
         "the", "mind", "to", "suffer")


@dataclass(frozen=True)
class Arrival:
    at_s: float  # seconds after the load starts
    prompt: str
    max_tokens: int


def arrivals(rate: float, seconds: float, seed: int) -> list[Arrival]:
    """Poisson arrivals at `rate` per second for `seconds`, prompts of 8-120 words, answers of 16-64 tokens."""
    rng, at, out = random.Random(seed), 0.0, []
    while True:
        at += rng.expovariate(rate)
        if at >= seconds:
            return out
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 120))]
        out.append(Arrival(at, f"{len(out)} " + " ".join(words), rng.choice((16, 32, 64))))


@dataclass(frozen=True)
class Outcome:
    status: int  # HTTP status, 0 for a connection error
    seconds: float
    num_layers: int | None


async def _send(client: httpx.AsyncClient, body: dict, start: float, arrival: Arrival) -> Outcome:
    await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
    sent = time.perf_counter()
    try:
        response = await client.post("/v1/completions", json={**body, "prompt": arrival.prompt,
                                                               "max_tokens": arrival.max_tokens, "temperature": 0})
    except httpx.HTTPError:
        return Outcome(0, time.perf_counter() - sent, None)
    served = response.headers.get(HEADER)
    return Outcome(response.status_code, time.perf_counter() - sent, int(served) if served else None)


async def _run(url: str, body: dict, load: list[Arrival]) -> list[Outcome]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        return await asyncio.gather(*(_send(client, body, start, arrival) for arrival in load))


def run_load(url: str, body: dict, load: list[Arrival]) -> list[Outcome]:
    """Sends `load` open-loop (each request at its arrival time, whatever the answers before it)."""
    return asyncio.run(_run(url, body, load))


def capacity(url: str, body: dict, clients: int = 16, requests: int = 48, seed: int = 0) -> float:
    """Requests per second the server finishes for `body` with `clients` requests always in flight."""
    load = [Arrival(0.0, a.prompt, a.max_tokens) for a in arrivals(1e6, 1.0, seed)[:requests]]

    async def closed_loop() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            gate = asyncio.Semaphore(clients)

            async def one(arrival: Arrival) -> None:
                async with gate:
                    await _send(client, body, time.perf_counter(), arrival)

            start = time.perf_counter()
            await asyncio.gather(*(one(arrival) for arrival in load))
            return len(load) / (time.perf_counter() - start)

    return asyncio.run(closed_loop())


def summarize(outcomes: list[Outcome], seconds: float, target_s: float, quality: dict[int, float]) -> dict:
    """Goodput, rejections and latency of one load on one server."""
    ok = [o for o in outcomes if o.status == 200]
    latencies = sorted(o.seconds for o in ok)
    served = [o.num_layers for o in ok if o.num_layers is not None]
    scored = [quality[n] for n in served if n in quality]
    return {"requests": len(outcomes), "ok": len(ok), "rejected_429": sum(o.status == 429 for o in outcomes),
            "other_failures": sum(o.status not in (200, 429) for o in outcomes),
            "within_target": sum(o.seconds <= target_s for o in ok) / max(1, len(outcomes)),
            "goodput_per_s": sum(o.seconds <= target_s for o in ok) / seconds,
            "p50_s": statistics.median(latencies) if latencies else None,
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else None,
            "mean_num_layers": statistics.fmean(served) if served else None,
            "share_largest": sum(n == max(quality, default=0) for n in served) / max(1, len(served)),
            "mean_answer_perplexity": statistics.fmean(scored) if scored else None}


def load_goals(report: dict) -> dict:
    """The issue's goals, each measured: elastic serves the teacher at <= 1x load, keeps its target with no
    rejection within the family's speed range, and has at least the teacher-only servers' goodput everywhere."""
    elastic = report["servers"]["elastic"]
    teacher_only = [report["servers"][name] for name in ("teacher_reject", "teacher_queue")]
    within = [m for m in report["multiples"] if m <= report["speed_range"]]
    low = [m for m in report["multiples"] if m <= 1]
    return {
        "elastic_teacher_share_at_most_1x": min(elastic[str(m)]["share_largest"] for m in low) if low else None,
        "elastic_within_target_in_range": min(elastic[str(m)]["within_target"] for m in within) if within else None,
        "elastic_rejections_in_range": sum(elastic[str(m)]["rejected_429"] for m in within),
        "elastic_goodput_over_best_teacher_only_min": min(
            elastic[str(m)]["goodput_per_s"] / max(1e-9, max(s[str(m)]["goodput_per_s"] for s in teacher_only))
            for m in report["multiples"])}
