"""The server a user would pick instead, side by side in one run: llama.cpp's `llama-server` on the teacher's
own GGUF, requantized to the bits our weights hold (F32 beside float, Q8_0 beside int8, its own Q4_1 beside
q4), the same threads, the same requests over HTTP; every figure is reported for both and as ours / theirs.

Figures: decode rate of one stream (the time of a 1-token answer taken from that of a 129-token one, so
prefill cancels out), time to a first token for 32- and 512-token prompts (a 1-token answer), and total
tokens/s of 16 concurrent clients, with 32-token prompts and with prompts of lengths spread over 16-496
tokens (the same lengths for both servers).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import time
from pathlib import Path

import httpx

from services.bench.served import ReadyProcess
from services.bench.soak import rss_of

PEER_TYPES = {"float": "F32", "int8": "Q8_0", "q4": "Q4_1"}  # llama.cpp's type of the same bits per weight as ours
DECODE_TOKENS = 128
CLIENTS = 16
PROMPT_LENGTHS = (32, 512)
SPREAD_PROMPT_LENGTHS = (16, 496)  # the 16 clients' second run: prompt lengths drawn from this range
LOG_TAIL = 500  # characters of a failing tool's output quoted in the error


def peer_gguf(server: Path, source: Path, weights: str, out_dir: Path) -> Path:
    """The teacher's GGUF requantized for the peer by its own `llama-quantize` (made once per folder)."""
    kind = PEER_TYPES[weights]
    if source.stem.endswith(f".{kind}"):
        return source  # already in the peer's type (the teacher's own Q4_1 file): served as it is
    target = out_dir / f"{source.stem}.{kind}.gguf"
    if not target.exists():  # written under another name first: an interrupted run leaves no half file behind
        out_dir.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        done = subprocess.run(
            [str(server.with_name("llama-quantize")), "--allow-requantize", str(source), str(partial), kind],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"llama-quantize failed: {done.stderr.strip()[-LOG_TAIL:]}")
        partial.replace(target)
    return target


class PeerServer(ReadyProcess):
    """`llama-server` on loopback with `CLIENTS` slots of `context` tokens each."""

    ready_path = "/health"

    def __init__(self, server: Path, gguf: Path, threads: int, context: int):
        super().__init__(
            lambda port: [
                str(server),
                "-m",
                str(gguf),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "-t",
                str(threads),
                "-tb",
                str(threads),
                "-np",
                str(CLIENTS),
                "-c",
                str(CLIENTS * context),
                "--no-webui",
            ]
        )


WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wise",
    "owls",
    "count",
    "stars",
    "above",
    "quiet",
    "hills",
)


def prompt_of(tokenizer, length: int, variant: int = 0) -> str:
    """Text of exactly `length` tokens under the pair's tokenizer (the GGUF carries the same vocabulary); each
    `variant` starts elsewhere in the word list, so no server answers it from a cached prefix."""
    start = variant % len(WORDS)
    words = (WORDS[start:] + WORDS[:start]) * (length // 4 + 8)
    ids = tokenizer(f"{variant} " + " ".join(words), add_special_tokens=False)["input_ids"][:length]
    return tokenizer.decode(ids)


class Prompts:
    """A new prompt of the asked length for every request (`next(n)`)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.used = tokenizer, 0

    def next(self, length: int) -> str:
        self.used += 1
        return prompt_of(self.tokenizer, length, self.used)


def _body(model: str, prompt: str, max_tokens: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


def _timed(client: httpx.Client, url: str, body: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    response = client.post(url + "/v1/completions", json=body)
    response.raise_for_status()
    return time.perf_counter() - start, response.json()["usage"]


def _median_latency(client: httpx.Client, url: str, bodies: list[dict]) -> tuple[float, dict]:
    runs = [_timed(client, url, body) for body in bodies]
    return statistics.median(seconds for seconds, _ in runs), runs[-1][1]


async def _clients(url: str, bodies: list[dict]) -> tuple[float, int]:
    """(seconds, completion tokens) of `bodies` sent by `CLIENTS` clients at once."""
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=CLIENTS)) as client:
        gate = asyncio.Semaphore(CLIENTS)

        async def one(body: dict) -> int:
            async with gate:
                response = await client.post(url + "/v1/completions", json=body)
                response.raise_for_status()
                return response.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(body) for body in bodies))
    return time.perf_counter() - start, sum(tokens)


def measure_server(url: str, model: str, prompts: Prompts, pid: int, repeats: int = 3) -> dict:
    """The figures of one server (see the module)."""

    def bodies(length: int, max_tokens: int, count: int = repeats) -> list[dict]:
        return [_body(model, prompts.next(length), max_tokens) for _ in range(count)]

    with httpx.Client(timeout=600) as client:
        _timed(client, url, _body(model, prompts.next(32), 8))  # warm-up
        one, _ = _median_latency(client, url, bodies(32, 1))
        long, usage = _median_latency(client, url, bodies(32, DECODE_TOKENS + 1))
        assert usage["completion_tokens"] == DECODE_TOKENS + 1, usage
        first = {n: _median_latency(client, url, bodies(n, 1)) for n in PROMPT_LENGTHS}
    seconds, tokens = asyncio.run(_clients(url, bodies(32, DECODE_TOKENS, 2 * CLIENTS)))
    rss = rss_of(pid)
    spread = [random.Random(i).randint(*SPREAD_PROMPT_LENGTHS) for i in range(2 * CLIENTS)]
    spread_seconds, spread_tokens = asyncio.run(_clients(url, [_body(model, prompts.next(n), DECODE_TOKENS)
                                                               for n in spread]))
    return {
        "decode_tokens_per_s": DECODE_TOKENS / (long - one),
        **{f"first_token_ms_{n}": 1000 * first[n][0] for n in PROMPT_LENGTHS},
        **{f"prompt_tokens_{n}": first[n][1]["prompt_tokens"] for n in PROMPT_LENGTHS},
        f"clients_{CLIENTS}_tokens_per_s": tokens / seconds,
        f"clients_{CLIENTS}_spread_prompts_tokens_per_s": spread_tokens / spread_seconds,
        "rss_mib": rss / 2**20,
        "rss_mib_after_spread_prompts": rss_of(pid) / 2**20,
    }


def ratios(ours: dict, theirs: dict) -> dict:
    """ours / theirs for rates, theirs / ours for times: above 1 means ours is better."""
    better = {}
    for key, value in ours.items():
        if key.startswith("prompt_tokens") or key not in theirs:
            continue
        better[key] = theirs[key] / value if key.startswith(("first_token", "rss")) else value / theirs[key]
    return better


def write_peer_report(report: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"peer-{report['weights']}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
