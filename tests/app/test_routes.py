"""Routes over a fake engine: readiness, auth, overload, limits, timeouts, SSE framing, metrics."""


import httpx
import pytest

from app.main import create_app
from app.settings import Settings
from services.errors import InvalidPairError
from tests.app.fake_engine import FakeEngine, GatedFactory
from tests.conftest import LiveServer, status, wait_for


def test_not_ready_while_loading_then_ready():
    factory = GatedFactory()
    live = LiveServer(create_app(Settings(), engine_factory=factory))
    live.thread.start()
    try:
        assert wait_for(lambda: status(live.url + "/health") == 200)
        assert status(live.url + "/ready") == 503
        response = httpx.post(live.url + "/v1/completions", json={"prompt": "x"})
        assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
        factory.release()
        assert wait_for(lambda: status(live.url + "/ready") == 200)
    finally:
        live.__exit__()


def test_failed_load_reports_and_asks_to_stop():
    stopped = []
    factory = GatedFactory(error=InvalidPairError("teacher and student differ in hidden_size: 576 vs 64"))
    factory.release()
    app = create_app(Settings(), engine_factory=factory, on_fatal=lambda: stopped.append(True))
    live = LiveServer(app)
    live.thread.start()
    try:
        assert wait_for(lambda: stopped == [True])
        assert "hidden_size" in app.state.load_error
    finally:
        live.__exit__()


@pytest.fixture
def make_server():
    servers = []

    def make(engine=None, **settings):
        engine = engine or FakeEngine()
        live = LiveServer(create_app(Settings(**settings), engine_factory=lambda s, m: engine)).__enter__()
        servers.append(live)
        return live, engine

    yield make
    for live in servers:
        live.__exit__()


def test_api_keys_guard_model_endpoints_but_not_health(make_server):
    live, _ = make_server(api_keys=["sekret-1", "sekret-2"])
    body = {"prompt": "hi", "max_tokens": 2}
    assert httpx.post(live.url + "/v1/completions", json=body).status_code == 401
    wrong = httpx.post(live.url + "/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    ok = httpx.post(live.url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekret-2"})
    assert ok.status_code == 200
    assert httpx.get(live.url + "/v1/models").status_code == 401
    assert httpx.get(live.url + "/health").status_code == 200
    assert httpx.get(live.url + "/ready").status_code == 200


def test_overload_answers_429_with_retry_after(make_server):
    live, _ = make_server(FakeEngine(capacity=0))
    response = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert response.status_code == 429 and response.headers["Retry-After"] == "2"
    streamed = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True})
    assert streamed.status_code == 429


def test_body_too_large_is_413(make_server):
    live, _ = make_server(max_body_bytes=2048)
    response = httpx.post(live.url + "/v1/completions", json={"prompt": "x" * 5000})
    assert response.status_code == 413 and response.json()["error"]["code"] == "payload_too_large"


def test_request_timeout_is_504_and_frees_the_engine(make_server):
    engine = FakeEngine(token_delay_s=0.2)
    live, _ = make_server(engine, request_timeout_s=0.3)
    response = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 50}, timeout=10)
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert wait_for(lambda: engine.in_flight == 0)


def test_sse_framing_and_usage(make_server):
    live, _ = make_server()
    body = {"prompt": "hi", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", live.url + "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert '"usage"' in events[-2] and '"completion_tokens": 3' in events[-2]


def test_metrics_are_labelled_by_size(make_server):
    live, _ = make_server()
    httpx.post(live.url + "/v1/completions", json={"model": "fake-3L", "prompt": "hi", "max_tokens": 3})
    text = httpx.get(live.url + "/metrics").text
    assert 'boomerang_requests_total{endpoint="completions",model="fake-3L",status="ok"} 1.0' in text
    assert 'boomerang_tokens_total{kind="completion",model="fake-3L"} 3.0' in text
    assert "boomerang_time_to_first_token_seconds_bucket" in text and "boomerang_queue_depth" in text


def test_metrics_show_memory_before_the_oom_killer_does(make_server):
    live, _ = make_server()
    text = httpx.get(live.url + "/metrics").text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines["process_resident_memory_bytes"]) > 0  # the process collector
    assert float(lines["boomerang_kv_reserved_bytes"]) == 4096.0 and float(lines["boomerang_kv_in_use_bytes"]) == 1024.0
    assert float(lines["boomerang_memory_bound_bytes"]) == 1e9 and float(lines["boomerang_weights_bytes"]) == 1e8
    assert "boomerang_running" in lines and "boomerang_queue_depth" in lines


def test_tokenize_detokenize_and_native_generate(make_server):
    live, _ = make_server()
    tokens = httpx.post(live.url + "/tokenize", json={"text": "abc"}).json()
    assert tokens == {"tokens": [0, 1, 2], "count": 3, "max_model_len": 64, "token_strs": None}
    assert httpx.post(live.url + "/detokenize", json={"tokens": [0, 1, 2]}).json() == {"prompt": "abc", "text": "abc"}
    generated = httpx.post(live.url + "/v1/generate", json={"prompt": "hi", "max_tokens": 2, "num_layers": 3}).json()
    assert generated["model"] == "fake-3L" and generated["outputs"][0]["text"] == "alpha beta "


def test_api_keys_never_reach_the_logs(make_server, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    live, _ = make_server(api_keys=["sekret-in-no-log"])
    for key in ("sekret-in-no-log", "wrong-key-guess"):
        httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                   headers={"Authorization": f"Bearer {key}"})
    assert caplog.records, "nothing was logged: the check would be vacuous"
    assert all("sekret-in-no-log" not in r.getMessage() and "wrong-key-guess" not in r.getMessage()
               for r in caplog.records)


def test_min_tokens_above_max_tokens_and_a_bias_outside_the_vocabulary_are_refused_by_name(make_server):
    live, _ = make_server()
    for extra, param in (({"min_tokens": 5}, "min_tokens"), ({"logit_bias": {"1000000": 1}}, "logit_bias")):
        body = {"model": "fake-3L", "prompt": "hi", "max_tokens": 2, **extra}
        response = httpx.post(live.url + "/v1/completions", json=body)
        assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


@pytest.mark.parametrize("field, value, status_code", [
    ("presence_penalty", 0.5, 200), ("presence_penalty", 3, 400), ("logit_bias", {"5": 100}, 200),
    ("logit_bias", {"5": 101}, 400), ("logit_bias", {"x": 1}, 400), ("min_p", 0.1, 200), ("min_tokens", 1, 200),
    ("stop_token_ids", [3], 200), ("repetition_penalty", 0, 400), ("best_of", 2, 400),
    ("response_format", {"type": "xml"}, 400), ("response_format", {"type": "json_schema"}, 400),
    ("tools", [{"type": "function"}], 400),
    ("user", "someone", 200), ("metadata", {"k": "v"}, 200), ("no_such_field", 1, 400),
])
def test_a_field_we_cannot_honour_is_refused_by_name_never_dropped(make_server, field, value, status_code, caplog):
    live, _ = make_server()
    body = {"model": "fake-3L", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    response = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert response.status_code == status_code, response.text
    if status_code == 400:
        error = response.json()["error"]
        assert error["param"] == field and field in error["message"] and error["code"] == "invalid_parameter"
    completion = httpx.post(live.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2, field: value})
    assert completion.status_code == status_code
    if field in ("user", "metadata"):
        assert f"request field '{field}' is not used" in caplog.text


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


@pytest.mark.parametrize("message, status_code, named", [
    ({"role": "user", "content": [{"type": "text", "text": "hi"}, IMAGE]}, 400, "image_url"),
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}, 400, "input_audio"),
    ({"role": "assistant", "content": "x", "tool_calls": [{"id": "1", "type": "function"}]}, 400,
     "messages[0].tool_calls[0].function: Field required"),
    # calls and results where the template has no tools (the fake engine's has none)
    ({"role": "assistant", "content": "x", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}, 400, "has no tools"),
    ({"role": "tool", "content": "42", "tool_call_id": "call_1"}, 400, "has no tools"),
    ({"role": "user", "content": "hi", "no_such_field": 1}, 400, "no_such_field"),
    # what the OpenAI SDK sends back with an assistant message it received: empty fields change nothing
    ({"role": "assistant", "content": "x", "refusal": None, "annotations": [], "tool_calls": None}, 200, None),
    ({"role": "assistant", "content": "x", "refusal": "no"}, 200, "refusal"),
])
def test_what_a_message_holds_beyond_text_is_refused_never_dropped(make_server, message, status_code, named, caplog):
    live, _ = make_server()
    body = {"model": "fake-3L", "messages": [message, {"role": "user", "content": "hi"}], "max_tokens": 2}
    response = httpx.post(live.url + "/v1/chat/completions", json=body)
    assert response.status_code == status_code, response.text
    if status_code == 400:
        error = response.json()["error"]
        assert error["param"] == "messages" and named in error["message"], error
    elif named:
        assert f"message field '{named}' is not used" in caplog.text


def test_an_unknown_stream_option_is_refused_by_name(make_server):
    live, _ = make_server()
    body = {"model": "fake-3L", "prompt": "hi", "max_tokens": 2, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    response = httpx.post(live.url + "/v1/completions", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options", response.text


def test_the_pair_s_sampling_defaults_apply_unless_the_request_sets_them():
    engine = FakeEngine()
    engine.defaults = {"repetition_penalty": 1.1, "presence_penalty": 1.0}
    with LiveServer(create_app(Settings(), engine_factory=lambda s, m: engine)) as live:
        assert wait_for(lambda: status(live.url + "/ready") == 200)
        body = {"prompt": "x", "max_tokens": 2}
        assert httpx.post(live.url + "/v1/completions", json=body).status_code == 200
        own = {**body, "repetition_penalty": 1.0, "presence_penalty": 0}
        assert httpx.post(live.url + "/v1/completions", json=own).status_code == 200
        chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(live.url + "/v1/chat/completions", json=chat).status_code == 200
        models = httpx.get(live.url + "/v1/models").json()["data"]
    assert [(p.repetition_penalty, p.presence_penalty) for p in engine.params_seen] == [(1.1, 1.0), (1.0, 0),
                                                                                        (1.1, 1.0)]
    assert all(entry["sampling_defaults"] == engine.defaults for entry in models)
    assert all(p.frequency_penalty == 0 for p in engine.params_seen)


def test_without_sampling_defaults_a_request_that_sets_nothing_is_not_penalised():
    engine = FakeEngine()
    with LiveServer(create_app(Settings(), engine_factory=lambda s, m: engine)) as live:
        assert wait_for(lambda: status(live.url + "/ready") == 200)
        assert httpx.post(live.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert [(p.repetition_penalty, p.presence_penalty, p.frequency_penalty) for p in engine.params_seen] == [
        (1.0, 0.0, 0.0)]
