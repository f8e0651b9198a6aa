"""The real server on loopback over a tiny random pair, driven by the `openai` package and httpx."""

import asyncio
import json

import httpx
import openai
import pytest
import torch
from openai import OpenAI

from app.main import create_app
from app.settings import Settings
from tests.conftest import LiveServer


@pytest.fixture(scope="module")
def server(llama_pair):
    settings = Settings(teacher=str(llama_pair[0]), student=str(llama_pair[1]), device="cpu", name="tiny",
                        max_concurrent=8, max_queue=32)
    with LiveServer(create_app(settings)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused")


def test_models_lists_every_size_and_the_family(client, server):
    models = client.models.list().data
    ids = [m.id for m in models]
    family = server.app.state.engine.family
    assert ids == [f"tiny-{n}L" for n in family.sizes] + ["tiny"]
    entry = models[0].model_dump()
    assert entry["num_layers"] == family.sizes[0] and entry["parameters"] > 0 and entry["bytes"] > 0


def test_vllm_shaped_tokenizer_endpoints_tokenize_as_the_server_does(server):
    family = server.app.state.engine.family
    messages = [{"role": "user", "content": "To be or not"}]
    templated = family.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = family.tokenizer(templated, add_special_tokens=False)["input_ids"]
    chat = httpx.post(server.url + "/tokenize", json={"messages": messages, "return_token_strs": True}).json()
    assert chat["tokens"] == want and chat["count"] == len(want)
    assert chat["token_strs"] == family.tokenizer.convert_ids_to_tokens(want)
    plain = httpx.post(server.url + "/tokenize", json={"prompt": templated}).json()
    assert plain["tokens"] == want and plain["max_model_len"] == chat["max_model_len"] > 0
    assert httpx.post(server.url + "/detokenize", json={"tokens": want}).json()["prompt"] == templated
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == family.tokenizer.eos_token and info["chat_template"] == family.tokenizer.chat_template
    models = httpx.get(server.url + "/v1/models").json()["data"]
    assert {m["max_model_len"] for m in models} == {info["max_model_len"]}
    both = httpx.post(server.url + "/tokenize", json={"prompt": "a", "messages": messages})
    assert both.status_code == 400


def test_log_likelihood_requests_take_one_forward_and_match_scoring_plus_generation(client, server):
    """lm-eval's request: echo, logprobs, max_tokens 1, greedy, several prompts; the token comes from the
    scoring pass and equals what generation picks."""
    prompts = ["To be, or not to be", "The quick brown fox jumps", "Hello"]
    engine = server.app.state.engine
    forwards = []
    original = engine._score_now
    engine._score_now = lambda *args: forwards.append(len(args[1])) or original(*args)
    try:
        both = client.completions.create(model="tiny-6L", prompt=prompts, max_tokens=1, temperature=0, echo=True,
                                         logprobs=1)
    finally:
        engine._score_now = original
    assert forwards == [len(prompts)]  # one scoring job for every prompt, no generation
    for prompt, choice in zip(prompts, both.choices):
        generated = client.completions.create(model="tiny-6L", prompt=prompt, max_tokens=1, temperature=0,
                                              logprobs=1)
        scored = client.completions.create(model="tiny-6L", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
        assert choice.text == prompt + generated.choices[0].text
        assert choice.finish_reason == generated.choices[0].finish_reason
        lp, want = choice.logprobs, scored.choices[0].logprobs
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:-1]), torch.tensor(want.token_logprobs[1:]))
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[-1]),
                                   torch.tensor(generated.choices[0].logprobs.token_logprobs[0]), atol=1e-4,
                                   rtol=1e-4)
    assert both.usage.completion_tokens == len(prompts)


def test_response_format_json_schema_answers_validate_at_every_size(client, server):
    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
              "required": ["city"], "additionalProperties": False}
    for size in server.app.state.engine.family.sizes:
        chat = client.chat.completions.create(
            model=f"tiny-{size}L", messages=[{"role": "user", "content": "Capital of France?"}], temperature=0,
            max_tokens=30, response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
        jsonschema.validate(json.loads(chat.choices[0].message.content), schema)
    anything = client.completions.create(model="tiny-6L", prompt="data:", max_tokens=40, temperature=0,
                                         extra_body={"guided_regex": "[a-c]{4}"})
    assert len(anything.choices[0].text) == 4 and set(anything.choices[0].text) <= set("abc")
    both = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "guided_regex": "a",
                                                             "response_format": {"type": "json_object"}})
    assert both.status_code == 400 and both.json()["error"]["param"] == "guided_regex"
    for body, field in (({"guided_json": {"type": "nonsense"}}, "guided_json"),
                        ({"guided_json": "not json"}, "guided_json"),
                        ({"response_format": {"type": "json_object"}, "min_tokens": 3}, "min_tokens"),
                        ({"stop_token_ids": [10**6], "min_tokens": 1}, "stop_token_ids")):
        broken = httpx.post(server.url + "/v1/completions", json={"prompt": "x", **body})
        assert broken.status_code == 400 and broken.json()["error"]["param"] == field, broken.text


def test_completion_names_the_size_used(client):
    out = client.completions.create(model="tiny-6L", prompt="To be", max_tokens=5, temperature=0)
    assert out.model == "tiny-6L"
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.completion_tokens <= 5
    by_layers = client.completions.create(model="tiny", prompt="To be", max_tokens=5, temperature=0,
                                          extra_body={"num_layers": 6})
    assert by_layers.model == "tiny-6L" and by_layers.choices[0].text == out.choices[0].text


def test_chat_and_streaming(client):
    chat = client.chat.completions.create(model="tiny-7L", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.model == "tiny-7L" and chat.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(
        model="tiny-7L", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_score_path_equals_offline_variant_for_three_sizes(client, server):
    family = server.app.state.engine.family
    text = "To be, or not to be, that is the question"
    ids = family.tokenizer(text, add_special_tokens=False)["input_ids"]
    for size in family.sizes[:3]:
        out = client.completions.create(model=f"tiny-{size}L", prompt=text, max_tokens=0, echo=True, logprobs=1)
        logprobs = out.choices[0].logprobs.token_logprobs
        assert logprobs[0] is None and len(logprobs) == len(ids)
        with torch.no_grad():
            logits = family.variant(size)(torch.tensor([ids]), use_cache=False).logits[0]
        expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        torch.testing.assert_close(torch.tensor(logprobs[1:]), expected)
        native = httpx.post(server.url + "/v1/score", json={"text": text, "num_layers": size}).json()
        torch.testing.assert_close(torch.tensor(native["token_logprobs"][1:]), expected)


def test_twenty_concurrent_mixed_size_requests_match_sequential_answers(server):
    sizes = server.app.state.engine.family.sizes
    bodies = [{"model": f"tiny-{sizes[i % len(sizes)]}L", "prompt": f"Hello {i}", "max_tokens": 6,
               "temperature": 0} for i in range(20)]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        sequential = [http.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]

    async def concurrent():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            responses = await asyncio.gather(*[http.post("/v1/completions", json=b) for b in bodies])
        return [r.json() for r in responses]

    results = asyncio.run(concurrent())
    assert [r["model"] for r in results] == [b["model"] for b in bodies]
    assert [r["choices"][0]["text"] for r in results] == sequential


def test_n_choices_with_seed_are_reproducible(client):
    kwargs = dict(model="tiny-6L", prompt="Hello", max_tokens=5, temperature=1.0, n=3, seed=7)
    first, second = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.text for c in first.choices] == [c.text for c in second.choices]


def test_disconnect_mid_stream_frees_the_slot(server):
    engine = server.app.state.engine
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for _ in range(5):
            with http.stream("POST", "/v1/completions", json={"model": "tiny-6L", "prompt": "Hi", "stream": True,
                                                              "max_tokens": 500, "temperature": 0}) as response:
                for line in response.iter_lines():
                    if line.startswith("data: {"):
                        assert json.loads(line[6:])["model"] == "tiny-6L"
                        break
    for _ in range(300):
        if engine.stats()["in_flight"] == 0:
            break
        asyncio.run(asyncio.sleep(0.02))
    assert engine.stats()["in_flight"] == 0 and engine.stats()["running"] == 0


def test_errors_are_openai_shaped(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        cases = [
            ({"model": "tiny-99L", "prompt": "x"}, 404, "model"),
            ({"model": "gpt-4", "prompt": "x"}, 404, "model"),
            ({"model": "tiny-6L", "num_layers": 7, "prompt": "x"}, 400, "num_layers"),
            ({"model": "tiny-6L", "prompt": "x", "temperature": -1}, 400, "temperature"),
            ({"model": "tiny-6L", "prompt": "x", "top_p": 0}, 400, "top_p"),
            ({"model": "tiny-6L", "prompt": "x", "max_tokens": -3}, 400, "max_tokens"),
            ({"model": "tiny-6L", "prompt": ""}, 400, "prompt"),
            ({"model": "tiny-6L", "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
            ({"model": "tiny-6L", "prompt": [1, 2, 10**6]}, 400, "tokens"),
            ({"model": "tiny-6L", "prompt": "x", "n": 100}, 400, "n"),
            ({"model": "tiny-6L", "prompt": "x", "stop": ["a"] * 1000}, 400, "stop"),
        ]
        for body, status, param in cases:
            response = http.post("/v1/completions", json=body)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert error["param"] == param and error["message"] and error["type"], (body, error)
        long_prompt = http.post("/v1/completions", json={"model": "tiny-6L", "prompt": "word " * 300})
        assert long_prompt.status_code == 400
        assert long_prompt.json()["error"]["code"] == "context_length_exceeded"
        bad_json = http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and "error" in bad_json.json()
        assert http.get("/health").json() == {"status": "ok"}


def test_a_chat_with_no_max_tokens_answers_until_the_turn_or_the_context_ends(llama_pair):
    """OpenAI's chat has no default cap: a chat client that sends no max_tokens must not get 16 tokens."""
    settings = Settings(teacher=str(llama_pair[0]), student=str(llama_pair[1]), device="cpu", name="tiny",
                        max_total_tokens=64)
    with LiveServer(create_app(settings)) as live:
        client = OpenAI(base_url=live.url + "/v1", api_key="unused")
        chat = client.chat.completions.create(model="tiny-6L", messages=[{"role": "user", "content": "hi"}],
                                              temperature=0, extra_body={"ignore_eos": True})
        assert chat.choices[0].finish_reason == "length" and chat.usage.total_tokens == 64
        eos = live.app.state.engine.tokenizer.eos_token_id
        ended = client.chat.completions.create(  # the end of the turn made likeliest after two tokens
            model="tiny-6L", messages=[{"role": "user", "content": "hi"}], temperature=0, logprobs=True,
            top_logprobs=2, extra_body={"logit_bias": {str(eos): 100}, "min_tokens": 2})
        assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens <= 3
        assert all(1 <= len(item.top_logprobs) <= 2 for item in ended.choices[0].logprobs.content)
        completion = client.completions.create(model="tiny-6L", prompt="hi", temperature=0,
                                               extra_body={"ignore_eos": True})
        assert completion.usage.completion_tokens == 16
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="tiny-6L", messages=[{"role": "user", "content": "word " * 80}])
        assert refused.value.body["param"] == "messages"
