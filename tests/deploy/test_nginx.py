"""The shipped nginx config in front of two real replicas on loopback: balancing, streaming, failover, readiness."""

import asyncio
import json
import re
import signal
import time

import httpx
import pytest

from tests.conftest import status, wait_for
from tests.deploy.replicas import Nginx, Replica, nginx_available

pytestmark = pytest.mark.skipif(not nginx_available(), reason="nginx is not installed (make test installs it)")
BODY = {"model": "tiny-6L", "prompt": "Hello there", "max_tokens": 8, "temperature": 0}


def _served_count(replica: Replica) -> float:
    text = httpx.get(replica.url + "/metrics").text
    return sum(float(v) for v in re.findall(r'boomerang_requests_total\{endpoint="completions"[^}]*\} ([0-9.]+)', text))


@pytest.fixture
def replicas(llama_pair):
    started = [Replica(*llama_pair).start(wait=False) for _ in range(2)]
    for replica in started:
        assert wait_for(lambda r=replica: status(r.url + "/ready") == 200, 180)
    yield started
    for replica in started:
        replica.stop()


async def _many(url: str, count: int, concurrency: int, on_progress=None, retried: list | None = None) -> list[int]:
    codes: list[int] = []
    semaphore = asyncio.Semaphore(concurrency)

    async def one(http: httpx.AsyncClient) -> None:
        async with semaphore:
            try:
                response = await http.post("/v1/completions", json=BODY)
            except httpx.RemoteProtocolError:
                if retried is None:
                    raise
                # A response cut after its headers cannot be retried by a proxy; openai's client retries it.
                retried.append(1)
                response = await http.post("/v1/completions", json=BODY)
            codes.append(response.status_code)
            if on_progress:
                on_progress(len(codes))

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(*[one(http) for _ in range(count)])
    return codes


def test_requests_reach_both_replicas_and_sse_is_not_buffered(replicas, tmp_path):
    with Nginx(tmp_path, [r.port for r in replicas]) as nginx:
        codes = asyncio.run(_many(nginx.url, 24, 6))
        assert codes == [200] * 24
        assert all(_served_count(r) > 0 for r in replicas)

        body = {**BODY, "max_tokens": 120, "stream": True, "ignore_eos": True}
        chunks, events = 0, 0
        with httpx.stream("POST", nginx.url + "/v1/completions", json=body, timeout=60) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            for chunk in response.iter_raw():
                chunks += 1
                events += chunk.count(b"data: ")
        assert events >= 120
        assert chunks >= events / 4, f"{events} events arrived in only {chunks} reads: nginx is buffering"


def test_killing_a_replica_mid_load_loses_no_request(replicas, tmp_path):
    victim = replicas[0]

    def maybe_kill(done: int) -> None:
        if done == 10:
            victim.signal(signal.SIGKILL)

    retried: list = []
    with Nginx(tmp_path, [r.port for r in replicas]) as nginx:
        codes = asyncio.run(_many(nginx.url, 60, 8, maybe_kill, retried))
        assert codes == [200] * 60
        assert len(retried) <= 8, "more responses were cut than the victim could have had in flight"
        assert victim.process.wait(timeout=10) != 0
        assert asyncio.run(_many(nginx.url, 10, 4)) == [200] * 10


def test_a_loading_replica_is_kept_out(llama_pair, tmp_path):
    ready = Replica(*llama_pair).start()
    loading = Replica(*llama_pair).start(wait=False)
    try:
        with Nginx(tmp_path, [loading.port, ready.port]) as nginx:
            assert status(loading.url + "/ready") != 200, "the replica loaded before the test could use it"
            codes = asyncio.run(_many(nginx.url, 12, 4))
            assert codes == [200] * 12
    finally:
        ready.stop()
        loading.stop()


def test_sigterm_lets_an_inflight_stream_finish(llama_pair):
    replica = Replica(*llama_pair).start()
    try:
        body = {**BODY, "max_tokens": 200, "stream": True, "ignore_eos": True}
        events = []
        with httpx.stream("POST", replica.url + "/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 1:
                        replica.signal(signal.SIGTERM)
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert replica.process.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM once drained
        assert status(replica.url + "/health") is None  # it stopped accepting
    finally:
        replica.stop()


def test_a_replica_added_by_a_reload_takes_traffic_within_ten_seconds_and_one_removed_loses_none(replicas, tmp_path):
    """The fallback for an nginx older than 1.27.3 (no `resolve`): a new upstream list and `nginx -s reload`."""
    first, joining = replicas
    with Nginx(tmp_path, [first.port]) as nginx:
        assert asyncio.run(_many(nginx.url, 4, 2)) == [200] * 4 and _served_count(joining) == 0
        nginx.reload([first.port, joining.port])
        assert wait_for(lambda: asyncio.run(_many(nginx.url, 4, 4)) == [200] * 4 and _served_count(joining) > 0, 10)
        nginx.reload([joining.port])
        time.sleep(1)  # the old workers finish what they hold and exit
        before = _served_count(first)
        assert asyncio.run(_many(nginx.url, 8, 4)) == [200] * 8 and _served_count(first) == before
