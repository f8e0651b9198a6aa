"""Overload, disconnects and bad input against the real server on loopback (bounded in count and time)."""

import asyncio
import json
import time

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from services.bench.measure import rss_bytes
from tests.conftest import LiveServer

MAX_CONCURRENT, MAX_QUEUE = 4, 4


@pytest.fixture(scope="module")
def server(llama_pair):
    settings = Settings(teacher=str(llama_pair[0]), student=str(llama_pair[1]), device="cpu", name="tiny",
                        max_concurrent=MAX_CONCURRENT, max_queue=MAX_QUEUE, max_body_bytes=1_000_000)
    with LiveServer(create_app(settings)) as live:
        yield live


def _report(name: str, **figures) -> None:
    print(f"\nRELIABILITY {name}: " + json.dumps(figures))


def test_overload_at_four_times_concurrency_rejects_cleanly_and_loses_nothing(server):
    clients = 4 * (MAX_CONCURRENT + MAX_QUEUE)
    body = {"model": "tiny-6L", "prompt": "Hello", "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.url, timeout=60) as http:
        expected = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    rss_before = rss_bytes()
    health_codes: list[int] = []

    async def flood():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            async def health_probe():
                for _ in range(20):
                    health_codes.append((await http.get("/health")).status_code)
                    await asyncio.sleep(0.02)
            results = await asyncio.gather(*[http.post("/v1/completions", json=body) for _ in range(clients)],
                                           health_probe())
        return results[:-1]

    started = time.monotonic()
    responses = asyncio.run(flood())
    rejected = [r for r in responses if r.status_code == 429]
    completed = [r for r in responses if r.status_code == 200]
    lost = clients - len(rejected) - len(completed)
    _report("overload", tried=clients, rejected=len(rejected), completed=len(completed), lost=lost,
            seconds=round(time.monotonic() - started, 2), rss_growth_mb=round((rss_bytes() - rss_before) / 2**20, 1))
    assert lost == 0
    assert rejected and all(r.headers.get("Retry-After") for r in rejected)
    assert len(completed) >= MAX_CONCURRENT + MAX_QUEUE
    assert all(r.json()["choices"][0]["text"] == expected for r in completed)
    assert health_codes and set(health_codes) == {200}
    assert rss_bytes() - rss_before < 200 * 2**20


def test_hundred_disconnects_leave_queue_and_memory_where_they_were(server):
    engine = server.app.state.engine
    body = {"model": "tiny-7L", "prompt": "Hi", "max_tokens": 200, "stream": True, "ignore_eos": True}
    rss_before = rss_bytes()

    async def vanish():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http, \
                http.stream("POST", "/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    return

    async def many():
        semaphore = asyncio.Semaphore(MAX_CONCURRENT)

        async def one():
            async with semaphore:
                await vanish()
        await asyncio.gather(*[one() for _ in range(100)])

    asyncio.run(many())
    deadline = time.monotonic() + 20
    while engine.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = engine.stats()
    _report("disconnects", disconnected=100, in_flight_after=stats["in_flight"], waiting_after=stats["waiting"],
            rss_growth_mb=round((rss_bytes() - rss_before) / 2**20, 1))
    assert stats["in_flight"] == 0 and stats["waiting"] == 0 and stats["running"] == 0
    assert rss_bytes() - rss_before < 100 * 2**20


@pytest.mark.parametrize("content, status", [
    (b'{"prompt": "\xff\xfe bad utf-8", "max_tokens": 2}', 400),
    (b'{"prompt": 42}', 400),
    (b'{"prompt": ["a", 1]}', 400),
    (b'[]', 400),
    (b'{"prompt": "x", "max_tokens": "many"}', 400),
    (b'{"prompt": "x", "model": 7}', 400),
])
def test_malformed_bodies_get_400_never_500(server, content, status):
    response = httpx.post(server.url + "/v1/completions", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_control_characters_and_huge_bodies(server):
    control = httpx.post(server.url + "/v1/completions",
                         json={"model": "tiny-5L", "prompt": "a\x00b\x1b[31m\u202e", "max_tokens": 2})
    assert control.status_code == 200
    huge = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "' + b"x" * 10_000_000 + b'"}',
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413
    assert httpx.get(server.url + "/health").status_code == 200
