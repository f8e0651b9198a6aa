"""Served throughput: a real `boomerang serve` process on loopback under N concurrent clients."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ReadyProcess:
    """A server process on a free loopback port, entered once `ready_path` answers 200 and stopped with SIGTERM;
    one that exits or never gets ready is stopped and raises with the tail of its log."""

    ready_path = "/ready"
    ready_timeout_s = 300  # loading the models, once

    def __init__(self, args_for_port):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args_for_port(self.port)

    def _popen(self, log) -> subprocess.Popen:
        return subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)

    def __enter__(self):
        # a file, not a pipe: nobody reads the log while the server runs, and a full pipe would stall it
        self.log = tempfile.TemporaryFile()
        self.process = self._popen(self.log)
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        tail = self.log_tail()
        self.__exit__()
        raise RuntimeError(f"{self.args[0]} did not become ready: {tail}")

    def log_tail(self, chars: int = 500) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-chars:]

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)
        self.log.close()


class ServerProcess(ReadyProcess):
    """`python -m services.cli serve …`."""

    def __init__(self, serve_args: list[str]):
        super().__init__(lambda port: [sys.executable, "-m", "services.cli", "serve", "--port", str(port),
                                       *serve_args])

    def _popen(self, log) -> subprocess.Popen:
        return subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=log,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def model_cards(self) -> list[dict]:
        """The `/v1/models` entries: every size, and the family id for the teacher."""
        return httpx.get(self.url + "/v1/models", timeout=30).json()["data"]


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


async def _timed_completion(http: httpx.AsyncClient, body: dict) -> float:
    """Seconds until a whole (non-streamed) completion of `body` came back."""
    start = time.perf_counter()
    response = await http.post("/v1/completions", json=body)
    response.raise_for_status()
    return time.perf_counter() - start


async def _arrival_mid_batch(url: str, long_body: dict, short_body: dict) -> dict:
    """Latency of a short request sent while a long one decodes, and of each alone on an idle server."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        short_alone = statistics.median([await _timed_completion(http, short_body) for _ in range(3)])
        long_alone = await _timed_completion(http, long_body)
        long_task = asyncio.create_task(_timed_completion(http, long_body))
        await asyncio.sleep(long_alone / 4)  # a quarter of the way into the long request
        short_during = await _timed_completion(http, short_body)
        long_during = await long_task
    return {"long_tokens": long_body["max_tokens"], "short_tokens": short_body["max_tokens"],
            "short_alone_s": short_alone, "short_during_long_s": short_during,
            "short_slowdown": short_during / short_alone, "long_alone_s": long_alone,
            "long_with_short_s": long_during, "long_slowdown": long_during / long_alone}


def arrival_mid_batch(url: str, long_model: str, short_model: str, long_tokens: int, short_tokens: int) -> dict:
    """A short request (`short_model`) arriving a quarter of the way into a long one (`long_model`): how
    much longer each takes than alone. Batches that take joins start the short one at the next step."""
    body = {"prompt": "Once upon a time,", "temperature": 0, "ignore_eos": True}
    return asyncio.run(_arrival_mid_batch(url, {**body, "model": long_model, "max_tokens": long_tokens},
                                          {**body, "model": short_model, "max_tokens": short_tokens}))


async def _prompt_mid_stream(url: str, stream_body: dict, prompt_body: dict) -> dict:
    """A long prompt's latency alone and while a stream decodes, and the stream's gaps between tokens."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        prompt_alone = statistics.median([await _timed_completion(http, prompt_body) for _ in range(2)])
        stamps: list[float] = []

        async def stream() -> None:
            async with http.stream("POST", "/v1/completions", json={**stream_body, "stream": True}) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        stamps.append(time.perf_counter())

        streaming = asyncio.create_task(stream())
        while len(stamps) < 8 and not streaming.done():  # the stream is decoding
            await asyncio.sleep(0.005)
        prompt_during = await _timed_completion(http, prompt_body)
        await streaming
    gaps = [later - earlier for earlier, later in zip(stamps, stamps[1:])]
    return {"stream_tokens": stream_body["max_tokens"], "prompt_chars": len(prompt_body["prompt"]),
            "prompt_alone_s": prompt_alone, "prompt_during_stream_s": prompt_during,
            "stream_median_gap_s": statistics.median(gaps), "stream_longest_gap_s": max(gaps),
            "longest_gap_vs_prompt_alone": max(gaps) / prompt_alone}


def prompt_mid_stream(url: str, stream_model: str, prompt_model: str, prompt: str, stream_tokens: int) -> dict:
    """`prompt` (`prompt_model`, one new token) sent while a stream (`stream_model`) decodes: the stream's longest
    gap between two tokens, against the prompt's latency alone. Prefilled whole, a long prompt stalls the stream
    for all of its prefill; in chunks, for one chunk."""
    return asyncio.run(_prompt_mid_stream(
        url, {"model": stream_model, "prompt": "Once upon a time,", "max_tokens": stream_tokens, "temperature": 0,
              "ignore_eos": True},
        {"model": prompt_model, "prompt": prompt, "max_tokens": 1, "temperature": 0}))


def mixed_prompt_lengths(url: str, model_ids: list[str], tokenizer, requests: int, max_tokens: int,
                         mean_tokens: int, concurrency: int = 16) -> dict:
    """`concurrency` clients over the sizes round-robin, once with prompts of lengths spread evenly over
    [16, 2 x `mean_tokens` - 16] and once with all of their mean length (the same prompt tokens in all), each
    twice in turn: output tokens/s of each, and mixed ÷ same. Batched prompts are padded to the longest, so a
    server that batches any lengths together pays for the spread."""
    lengths = [random.Random(index).randint(16, 2 * mean_tokens - 16) for index in range(requests)]
    same = [round(statistics.mean(lengths))] * requests

    def bodies(counts: list[int]) -> list[dict]:  # each prompt new: a leading number
        return [{"model": model_ids[i % len(model_ids)], "prompt": f"{i}. " + long_prompt(tokenizer, count),
                 "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True} for i, count in enumerate(counts)]

    rates: dict[str, list[float]] = {"same": [], "mixed": []}
    for _ in range(2):
        for name, counts in (("same", same), ("mixed", lengths)):
            rates[name].append(asyncio.run(_load(url, bodies(counts), concurrency))["tokens_per_s"])
    mixed, uniform = (statistics.mean(rates[name]) for name in ("mixed", "same"))
    return {"concurrency": concurrency, "requests": requests, "max_tokens": max_tokens,
            "prompt_tokens": [min(lengths), max(lengths), same[0]], "tokens_per_s_mixed_lengths": rates["mixed"],
            "tokens_per_s_same_length": rates["same"], "mixed_vs_same": mixed / uniform}


def long_prompt(tokenizer, tokens: int) -> str:
    """Text of about `tokens` tokens (a few fewer once encoded again)."""
    sentence = "The king of a small country had many sons who loved the sea and the sky. "
    ids = tokenizer(sentence * (tokens // 4 + 1), add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)
