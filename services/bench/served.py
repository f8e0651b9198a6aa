"""Served throughput: a real `boomerang serve` process on loopback under N concurrent clients."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import httpx


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServerProcess:
    """`python -m services.cli serve …` on a free loopback port; stopped with SIGTERM."""

    def __init__(self, serve_args: list[str]):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "services.cli", "serve", "--port", str(self.port), *serve_args]

    def __enter__(self) -> ServerProcess:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()[-500:]}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


async def _load(url: str, bodies: list[dict], concurrency: int) -> dict:
    latencies, tokens = [], 0
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens
        while not queue.empty():
            body = queue.get_nowait()
            start = time.perf_counter()
            response = await http.post("/v1/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += response.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"concurrency": concurrency, "requests": len(bodies), "output_tokens": tokens,
            "tokens_per_s": tokens / elapsed, "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def served_throughput(url: str, model_ids: list[str], concurrencies: list[int], requests: int,
                      max_tokens: int) -> dict:
    """Output tokens/s and latency per concurrency, for one size and for sizes mixed round-robin."""
    results: dict[str, list[dict]] = {}
    for mix, ids in (("single_size", model_ids[:1]), ("mixed_sizes", model_ids)):
        bodies = [{"model": ids[i % len(ids)], "prompt": f"Once upon a time, number {i},", "max_tokens": max_tokens,
                   "temperature": 0, "ignore_eos": True} for i in range(requests)]
        results[mix] = [asyncio.run(_load(url, bodies, n)) for n in concurrencies]
        base = results[mix][0]["tokens_per_s"]
        for row in results[mix]:
            row["speedup_vs_sequential"] = row["tokens_per_s"] / base
    return results
