"""Elastic sizes on the real server over a tiny pair: `auto` and `allow_smaller` choose, explicit sizes stay."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from tests.conftest import LiveServer

HEADER = "x-boomerang-num-layers"


@pytest.fixture(scope="module")
def server(llama_pair):
    settings = Settings(teacher=str(llama_pair[0]), student=str(llama_pair[1]), device="cpu", name="tiny",
                        max_concurrent=4, max_queue=64, latency_target_ms=1e-3, overload_policy="degrade")
    with LiveServer(create_app(settings)) as live:
        yield live


def _chat(server, **body):
    payload = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0, **body}
    return httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=60)


def test_auto_takes_the_largest_size_its_budget_allows_and_names_it(server):
    sizes = server.app.state.engine.family.sizes
    roomy = _chat(server, model="tiny-auto", max_latency_ms=1e9)  # any size fits: the largest
    assert roomy.status_code == 200 and roomy.json()["model"] == f"tiny-{max(sizes)}L"
    assert roomy.headers[HEADER] == str(max(sizes))
    tight = _chat(server, num_layers="auto")  # the server's 1 µs target: nothing fits, the smallest serves
    assert tight.json()["model"] == f"tiny-{min(sizes)}L" and tight.headers[HEADER] == str(min(sizes))
    floored = _chat(server, model="tiny-auto", min_num_layers=sizes[2])
    assert floored.headers[HEADER] == str(sizes[2])
    capped = _chat(server, model=f"tiny-{sizes[3]}L", num_layers="auto", max_latency_ms=1e9)
    assert capped.headers[HEADER] == str(sizes[3])  # auto never goes above the size the model names


def test_under_a_flood_auto_shrinks_without_rejections_and_explicit_sizes_stay(server):
    sizes = server.app.state.engine.family.sizes

    async def flood():
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            bodies = [{"model": "tiny-auto"} if i % 3 == 0 else {"model": f"tiny-{sizes[-1]}L"} if i % 3 == 1
                      else {"model": f"tiny-{sizes[-1]}L", "allow_smaller": True} for i in range(36)]
            return await asyncio.gather(*[client.post("/v1/completions", json={
                "prompt": f"To be {i}", "max_tokens": 6, "temperature": 0, **body}) for i, body in enumerate(bodies)])

    responses = asyncio.run(flood())
    assert [r.status_code for r in responses] == [200] * 36  # 0 rejections
    served = [int(r.headers[HEADER]) for r in responses]
    assert all(n == min(sizes) for n in served[0::3])  # auto: shrunk to what the target allows
    assert all(n == max(sizes) for n in served[1::3])  # explicit: never changed
    assert all(n == min(sizes) for n in served[2::3])  # allow_smaller under --overload-policy degrade
    metrics = httpx.get(server.url + "/metrics").text
    assert f'boomerang_size_choices_total{{requested="{max(sizes)}",served="{min(sizes)}"}}' in metrics


def test_models_carry_speed_learned_from_traffic(server):
    def speeds():
        return {e["id"]: e["speed"]["decode_tokens_per_s"] for e in httpx.get(server.url + "/v1/models").json()["data"]}

    before = speeds()
    for _ in range(3):
        response = _chat(server, model=f"tiny-{server.app.state.engine.family.sizes[0]}L", max_tokens=12,
                         ignore_eos=True)
        assert response.status_code == 200
    after = speeds()
    assert all(after[k] != before[k] and after[k] > 0 for k in before), (before, after)  # every size follows traffic


def test_a_floor_above_the_size_asked_is_refused(server):
    sizes = server.app.state.engine.family.sizes
    response = _chat(server, model=f"tiny-{sizes[0]}L", num_layers="auto", min_num_layers=sizes[1])
    assert response.status_code == 400 and response.json()["error"]["param"] == "min_num_layers"
