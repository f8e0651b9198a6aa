"""`boomerang bench --soak MINUTES`: mixed traffic against a real server while its resident memory is sampled.

Concurrent clients send what an operator would see behind a load balancer: completions of random sizes and
lengths (greedy and sampled, some with `n` > 1), streamed chats of which a fifth are dropped after a few chunks,
prompt scoring (`echo` + `logprobs`, `max_tokens` 0) and bad input. The verdict: resident memory at the end
within a tolerance of its level after the first minute (or half the soak when it is shorter; each level the
median of 30 s of samples), under the server's documented bound (`/metrics`: what it held when ready plus the
KV and work its limits allow), no 5xx and no error inside a stream, no connection error, every bad input
answered with a 4xx, good requests refused at most 1% of the time, and no KV still in use once traffic stops.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import statistics
import time
from dataclasses import dataclass, field

import httpx

SAMPLE_EVERY_S = 5.0
LEVEL_WINDOW_S = 30.0  # memory "at" a point is the median over this long from it
PROSE = ("the river ran past a house where an old king kept his bees and counted the summer days while "
         "children sang about ships the sea and a clock that never struck twelve")
WORDS = tuple(PROSE.split())
CHAT_PROMPTS = ("What is the capital of France?", "Name three primary colors.", "Write a haiku about rain.",
                "Give me a tip for sleeping better.", "Explain what a prime number is.",
                "Translate 'good morning' to Spanish.", "What should I cook tonight?")


@dataclass
class Tally:
    """What the clients saw."""

    ok: int = 0
    dropped: int = 0  # streams the client closed on purpose
    client_errors: int = 0  # 4xx to good requests (e.g. 429): counted, not a failure by themselves
    bad_refused: int = 0  # bad input answered with a 4xx
    bad_accepted: int = 0  # bad input answered otherwise: a failure
    server_errors: int = 0  # 5xx, an error inside a stream, or a stream the server cut short
    connection_errors: int = 0
    kv_in_use_after: float = 0.0  # KV bytes in use once the traffic stopped
    latencies: dict[str, list[float]] = field(default_factory=dict)

    def latency(self, kind: str, seconds: float) -> None:
        self.latencies.setdefault(kind, []).append(seconds)


def rss_of(pid: int) -> int:
    """Resident bytes of process `pid`, from /proc."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _completion(rng: random.Random, models: list[str], prompt_words: tuple[int, int]) -> dict:
    greedy = rng.random() < 0.5
    body = {"model": rng.choice(models), "prompt": _prompt(rng, rng.randint(*prompt_words)),
            "max_tokens": rng.randint(4, 48), "temperature": 0 if greedy else 0.8}
    if not greedy and rng.random() < 0.3:
        body["n"] = rng.randint(2, 3)
    return body


def _bad(rng: random.Random, models: list[str]) -> dict | bytes:
    """One of several kinds of bad input; each must be answered with a 4xx."""
    model = rng.choice(models)
    return rng.choice([
        {"model": "no-such-model", "prompt": "hi", "max_tokens": 4},
        {"model": model, "prompt": "hi", "max_tokens": -3},
        {"model": model, "prompt": "", "max_tokens": 4},
        {"model": model, "prompt": "hi", "max_tokens": 10 ** 7},
        {"model": model, "prompt": [10 ** 9], "max_tokens": 4},
        {"model": model, "prompt": "hi", "temperature": "hot"},
        b'{"model": "broken json',
    ])


class Traffic:
    def __init__(self, http: httpx.AsyncClient, models: list[str], rng: random.Random, tally: Tally,
                 prompt_words: tuple[int, int]):
        self.http, self.models, self.rng, self.tally = http, models, rng, tally
        self.prompt_words = prompt_words

    async def one(self) -> None:
        kind = self.rng.choices(["completion", "chat", "score", "bad"], weights=[45, 30, 15, 10])[0]
        start = time.perf_counter()
        try:
            await getattr(self, kind)()
        except httpx.TransportError:
            self.tally.connection_errors += 1
            return
        self.tally.latency(kind, time.perf_counter() - start)

    def _count(self, response: httpx.Response) -> None:
        if response.status_code >= 500:
            self.tally.server_errors += 1
        elif response.status_code >= 400:
            self.tally.client_errors += 1
        else:
            self.tally.ok += 1

    async def completion(self) -> None:
        self._count(await self.http.post("/v1/completions", json=_completion(self.rng, self.models,
                                                                            self.prompt_words)))

    async def score(self) -> None:
        prompt = _prompt(self.rng, self.rng.randint(*self.prompt_words))
        body = {"model": self.rng.choice(self.models), "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 1}
        self._count(await self.http.post("/v1/completions", json=body))

    async def chat(self) -> None:
        drop_after = self.rng.randint(1, 4) if self.rng.random() < 0.2 else None
        body = {"model": self.rng.choice(self.models), "stream": True, "max_tokens": self.rng.randint(8, 48),
                "temperature": self.rng.choice([0, 0.7]),
                "messages": [{"role": "user", "content": self.rng.choice(CHAT_PROMPTS)}]}
        async with self.http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return self._count(response)
            chunks, done, failed = 0, False, False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                chunks += 1
                payload = line.removeprefix("data:").strip()
                done = done or payload == "[DONE]"
                failed = failed or (payload.startswith("{") and "error" in json.loads(payload))
                if drop_after is not None and chunks >= drop_after:
                    self.tally.dropped += 1
                    return  # leaving the block closes the connection mid-stream
        if failed or not done:  # an error inside a 200 stream, or a stream cut short by the server
            self.tally.server_errors += 1
        else:
            self._count(response)

    async def bad(self) -> None:
        body = _bad(self.rng, self.models)
        if isinstance(body, bytes):
            response = await self.http.post("/v1/completions", content=body,
                                            headers={"content-type": "application/json"})
        else:
            response = await self.http.post("/v1/completions", json=body)
        if 400 <= response.status_code < 500:
            self.tally.bad_refused += 1
        else:
            self.tally.bad_accepted += 1
            self.tally.server_errors += response.status_code >= 500


def _gauges(text: str) -> dict[str, float]:
    """The `boomerang_*_bytes` gauges of a `/metrics` page."""
    return {name: float(value) for name, value in re.findall(r"^(boomerang_\w+_bytes) (\S+)$", text, re.M)}


async def _sample(http: httpx.AsyncClient, pid: int, timeline: list[tuple[float, int, float]], start: float,
                  end: float) -> None:
    """(seconds, resident bytes, KV bytes reserved) every few seconds until `end`, and once at it."""
    while True:
        now = time.monotonic()
        gauges = _gauges((await http.get("/metrics")).text)
        timeline.append((now - start, rss_of(pid), gauges.get("boomerang_kv_reserved_bytes", 0.0)))
        if now >= end:
            return
        await asyncio.sleep(min(SAMPLE_EVERY_S, max(0.0, end - now)))


async def _soak(url: str, pid: int, models: list[str], minutes: float, clients: int,
                prompt_words: tuple[int, int], seed: int) -> tuple[Tally, list[tuple[float, int]], float]:
    tally, timeline = Tally(), []
    start = time.monotonic()
    end = start + minutes * 60
    limits = httpx.Limits(max_connections=clients * 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        async def client(index: int) -> None:
            traffic = Traffic(http, models, random.Random(seed * 1000 + index), tally, prompt_words)
            while time.monotonic() < end:
                await traffic.one()

        sampler = asyncio.create_task(_sample(http, pid, timeline, start, end))
        await asyncio.gather(*[client(i) for i in range(clients)])
        await sampler
        tally.kv_in_use_after = await _kv_in_use_once_idle(http)
    return tally, timeline, time.monotonic() - start


async def _kv_in_use_once_idle(http: httpx.AsyncClient, wait_s: float = 10.0) -> float:
    """KV bytes still in use once the traffic has stopped (every batch gone: 0 unless blocks leaked)."""
    deadline = time.monotonic() + wait_s
    while True:
        in_use = _gauges((await http.get("/metrics")).text).get("boomerang_kv_in_use_bytes", 0.0)
        if in_use == 0 or time.monotonic() > deadline:
            return in_use
        await asyncio.sleep(0.5)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def server_bound(url: str, pid: int) -> dict:
    """The most the server may hold by its own formula (`/metrics`): its resident memory now, with the weights
    loaded, plus the KV and work bytes its limits allow."""
    gauges = _gauges(httpx.get(url + "/metrics", timeout=30).text)
    rss = rss_of(pid)
    extra = gauges["boomerang_memory_bound_bytes"] - gauges["boomerang_weights_bytes"]
    return {"rss_ready_mib": rss / 2 ** 20, "limits_allow_mib": extra / 2 ** 20, "bound_mib": (rss + extra) / 2 ** 20}


def verdict(timeline: list[tuple[float, int, float]], tally: Tally, tolerance: float, bound_mib: float) -> dict:
    """Growth of resident memory from the reference point (one minute in, or half of a shorter soak) to the
    end, and whether the soak passed."""
    total = timeline[-1][0]
    reference_at = min(60.0, total / 2)
    reference = _level(timeline, reference_at, reference_at + LEVEL_WINDOW_S)
    end = _level(timeline, total - LEVEL_WINDOW_S, total + 1)
    growth = end / reference - 1
    peak = max(rss for _, rss, _ in timeline) / 2 ** 20
    checks = {"memory_flat": growth <= tolerance, "under_bound": peak <= bound_mib, "no_5xx": tally.server_errors == 0,
              "no_connection_errors": tally.connection_errors == 0, "bad_input_4xx": tally.bad_accepted == 0,
              "good_requests_served": tally.ok > 0 and tally.client_errors <= 0.01 * tally.ok,
              "kv_returned": tally.kv_in_use_after == 0}
    return {"reference_s": reference_at, "rss_reference_mib": reference / 2 ** 20, "rss_end_mib": end / 2 ** 20,
            "rss_peak_mib": peak, "bound_mib": bound_mib, "growth": growth, "tolerance": tolerance,
            "kv_in_use_after_mib": tally.kv_in_use_after / 2 ** 20, "checks": checks, "passed": all(checks.values())}


def _level(timeline: list[tuple[float, int, float]], start: float, end: float) -> float:
    """Resident memory over a window: the median of its samples (one sample is at a random phase of a prefill)."""
    return statistics.median([rss for t, rss, _ in timeline if start <= t < end] or [timeline[-1][1]])


def run_soak(url: str, pid: int, models: list[str], minutes: float, clients: int = 8,
             prompt_words: tuple[int, int] = (4, 60), seed: int = 0, tolerance: float = 0.05) -> dict:
    """Soak the server at `url` (process `pid`) and report the RSS timeline, latencies and the verdict."""
    bound = server_bound(url, pid)
    tally, timeline, seconds = asyncio.run(_soak(url, pid, models, minutes, clients, prompt_words, seed))
    latencies = {kind: {"count": len(v), "p50_s": statistics.median(v), "p99_s": _percentile(v, 0.99)}
                 for kind, v in sorted(tally.latencies.items())}
    counts = {name: getattr(tally, name) for name in ("ok", "dropped", "client_errors", "bad_refused",
                                                       "bad_accepted", "server_errors", "connection_errors")}
    return {"minutes": minutes, "clients": clients, "models": models, "prompt_words": prompt_words,
            "seconds": seconds, "counts": counts, "latency": latencies, "bound": bound,
            "timeline_mib": [(round(t, 1), round(rss / 2 ** 20, 1), round(kv / 2 ** 20, 1)) for t, rss, kv in timeline],
            "verdict": verdict(timeline, tally, tolerance, bound["bound_mib"])}


def print_timeline(report: dict) -> None:
    """The timeline, one sample a line (resident memory, KV reserved), then the verdict."""
    for seconds, rss, kv in report["timeline_mib"]:
        print(f"  {seconds:7.1f} s  RSS {rss:8.1f} MiB  KV reserved {kv:7.1f} MiB")
    v = report["verdict"]
    print(f"RSS {v['rss_reference_mib']:.1f} MiB at {v['reference_s']:.0f} s -> {v['rss_end_mib']:.1f} MiB at the end "
          f"(medians over {LEVEL_WINDOW_S:.0f} s) "
          f"({v['growth']:+.1%}, tolerance {v['tolerance']:+.0%}); peak {v['rss_peak_mib']:.1f} MiB, "
          f"bound {v['bound_mib']:.1f} MiB")
    print(f"requests: {report['counts']}")
    for kind, row in report["latency"].items():
        print(f"  {kind:10s} n={row['count']:5d}  p50 {row['p50_s']:.3f} s  p99 {row['p99_s']:.3f} s")
    print("soak " + ("PASSED" if v["passed"] else f"FAILED: {[k for k, ok in v['checks'].items() if not ok]}"))
