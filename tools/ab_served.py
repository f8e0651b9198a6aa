"""Served speed of two checkouts side by side: each serves the same pair in turn (A, B, A, B), same requests.

    python tools/ab_served.py OLD_CHECKOUT NEW_CHECKOUT -- --teacher T --student S --order ...

Prints tokens/s per checkout and round for one stream (greedy, fixed length) and for 8 concurrent clients of
mixed sizes, then B / A from the best round of each. Used to show a change costs the served path nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx

SIZES = (16, 20, 23, 26, 30)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(checkout: str, serve_args: list[str]) -> tuple[subprocess.Popen, str, object]:
    port = free_port()
    log = tempfile.TemporaryFile()  # noqa: SIM115 - kept open for the server's lifetime, closed by the caller
    process = subprocess.Popen([sys.executable, "-m", "services.cli", "serve", "--port", str(port), *serve_args],
                               cwd=checkout, stdout=subprocess.DEVNULL, stderr=log,
                               env={**os.environ, "PYTHONPATH": checkout, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(log.read().decode(errors="replace")[-2000:])
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return process, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("not ready")


def body(n: int, tokens: int, i: int) -> dict:
    return {"prompt": f"Request {i}: once upon a time, in a land far away,", "num_layers": n,
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True}


async def run_load(url: str, bodies: list[dict], concurrency: int) -> float:
    queue: asyncio.Queue = asyncio.Queue()
    for b in bodies:
        queue.put_nowait(b)
    done = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal done
        while not queue.empty():
            b = queue.get_nowait()
            response = await http.post("/v1/completions", json=b)
            response.raise_for_status()
            done += response.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await http.post("/v1/completions", json=body(16, 4, -1))  # warm
        start = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(concurrency)])
    return done / (time.perf_counter() - start)


def measure(url: str) -> dict:
    single = {n: asyncio.run(run_load(url, [body(n, 128, i) for i in range(2)], 1)) for n in (16, 30)}
    mixed = [body(SIZES[i % len(SIZES)], 64, i) for i in range(48)]
    return {"one_stream_16L": single[16], "one_stream_30L": single[30],
            "clients8_mixed": asyncio.run(run_load(url, mixed, 8))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--rounds", type=int, default=2)
    args, serve_args = parser.parse_known_args()
    serve_args = [a for a in serve_args if a != "--"]
    results: dict[str, list[dict]] = {"A": [], "B": []}
    for round_index in range(args.rounds):
        for name, checkout in (("A", args.a), ("B", args.b)):
            process, url, log = start(checkout, serve_args)
            try:
                figures = measure(url)
            finally:
                process.terminate()
                process.wait(timeout=60)
                log.close()
            results[name].append(figures)
            print(json.dumps({"round": round_index, "checkout": name, **figures}), flush=True)
    best = {name: {k: max(r[k] for r in rounds) for k in rounds[0]} for name, rounds in results.items()}
    print(json.dumps({"best_A": best["A"], "best_B": best["B"],
                      "B_over_A": {k: best["B"][k] / best["A"][k] for k in best["A"]}}, indent=1))


if __name__ == "__main__":
    main()
