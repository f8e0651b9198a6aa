"""Tool calling over the real server on loopback: a tiny pair whose chat template renders tools (Qwen2.5's
shape), driven by the `openai` SDK and LangChain; and the 400s where the template has none."""

import json
from typing import Literal

import httpx
import jsonschema
import openai
import pytest
from openai import OpenAI

from app.main import create_app
from app.settings import Settings
from tests.conftest import LiveServer

WEATHER = {"type": "function", "function": {
    "name": "weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}},
                                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris this week?"}]


def _settings(pair) -> Settings:
    return Settings(teacher=str(pair[0]), student=str(pair[1]), device="cpu", name="tiny", max_concurrent=8,
                    max_queue=32, max_total_tokens=1024)


@pytest.fixture(scope="module")
def server(tools_pair):
    with LiveServer(create_app(_settings(tools_pair))) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused")


def _schema(name: str) -> dict:
    return next(t for t in (WEATHER, TIME) if t["function"]["name"] == name)["function"]["parameters"]


def test_required_tool_choice_answers_a_valid_call_at_every_size(client, server):
    for size in server.app.state.engine.family.sizes:
        chat = client.chat.completions.create(model=f"tiny-{size}L", messages=ASK, tools=[WEATHER, TIME],
                                              tool_choice="required", parallel_tool_calls=False, temperature=0,
                                              max_tokens=120)
        choice = chat.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), _schema(call.function.name))


def test_a_named_tool_is_the_one_called_and_streaming_gives_the_same_call(client):
    named = {"type": "function", "function": {"name": "time"}}
    whole = client.chat.completions.create(model="tiny-6L", messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                           temperature=0, max_tokens=120)
    (call,) = whole.choices[0].message.tool_calls
    assert call.function.name == "time"
    jsonschema.validate(json.loads(call.function.arguments), _schema("time"))
    chunks = list(client.chat.completions.create(model="tiny-6L", messages=ASK, tools=[WEATHER, TIME],
                                                 tool_choice=named, temperature=0, max_tokens=120,
                                                 stream=True))
    deltas = [d for chunk in chunks for d in chunk.choices[0].delta.tool_calls or ()]
    assert [(d.index, d.function.name, d.function.arguments) for d in deltas] == [
        (0, "time", call.function.arguments)]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == ""


def test_auto_and_none_answer_and_a_conversation_with_calls_and_results_renders(client, server):
    auto = client.chat.completions.create(model="tiny-6L", messages=ASK, tools=[WEATHER], max_tokens=8,
                                          temperature=0)
    assert auto.choices[0].finish_reason in ("stop", "length", "tool_calls")
    none = client.chat.completions.create(model="tiny-6L", messages=ASK, tools=[WEATHER], tool_choice="none",
                                          max_tokens=8, temperature=0, extra_body={"parallel_tool_calls": None})
    assert none.choices[0].message.tool_calls is None
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    rendered = httpx.post(server.url + "/tokenize", json={"messages": history}).json()["tokens"]
    text = server.app.state.engine.detokenize(rendered)
    assert '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}' in text and "sunny, 21 C" in text
    follow_up = client.chat.completions.create(model="tiny-6L", messages=history, tools=[WEATHER], max_tokens=4)
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "time"}}}, "tool_choice"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [WEATHER], "tool_choice": "required", "min_tokens": 5}, "min_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]}, "tools"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "weather", "arguments": "not json"}}]}]}, "messages"),
])
def test_inconsistent_tool_fields_get_a_400_naming_the_field(server, body, param):
    response = httpx.post(server.url + "/v1/chat/completions", json={"messages": ASK, **body})
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


def test_langchain_bind_tools_gets_tool_calls(server):
    langchain_openai = pytest.importorskip("langchain_openai")

    def capital(country: Literal["France", "Italy"]) -> str:
        """The capital of a country."""
        return country

    model = langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model="tiny-6L",
                                        temperature=0, max_retries=0)
    answer = model.bind_tools([capital], tool_choice="capital").invoke("Capital of France?")
    (call,) = answer.tool_calls
    assert call["name"] == "capital" and call["args"]["country"] in ("France", "Italy")


def test_a_pair_whose_template_has_no_tools_refuses_them(llama_pair):
    with LiveServer(create_app(_settings(llama_pair))) as live:
        client = OpenAI(base_url=live.url + "/v1", api_key="unused")
        with pytest.raises(openai.BadRequestError) as tools:
            client.chat.completions.create(model="tiny-6L", messages=ASK, tools=[WEATHER])
        assert tools.value.body["param"] == "tools" and "does not render tools" in tools.value.body["message"]
        history = [*ASK, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]}]
        with pytest.raises(openai.BadRequestError) as past_calls:
            client.chat.completions.create(model="tiny-6L", messages=history)
        assert past_calls.value.body["param"] == "messages"
        unused = client.chat.completions.create(model="tiny-6L", messages=ASK, tools=[WEATHER], tool_choice="none",
                                                max_tokens=2)
        assert unused.choices[0].message.tool_calls is None


def test_a_tool_result_without_a_name_gets_the_name_of_the_call_it_answers():
    from app.schemas import ChatMessage, template_messages

    messages = [ChatMessage(role="assistant", tool_calls=[
        {"id": "call_7", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]),
        ChatMessage(role="tool", tool_call_id="call_7", content="sunny"),
        ChatMessage(role="tool", tool_call_id="call_7", name="kept", content="rain")]
    rendered = template_messages(messages)
    assert rendered[0]["tool_calls"][0]["function"]["arguments"] == {}
    assert [m.get("name") for m in rendered[1:]] == ["weather", "kept"]


def test_a_template_s_own_refusal_is_a_400_naming_messages(server):
    engine = server.app.state.engine
    template = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = "{{ raise_exception('tool results need a name') }}"
    try:
        response = httpx.post(server.url + "/v1/chat/completions", json={"messages": ASK, "max_tokens": 2})
    finally:
        engine.tokenizer.chat_template = template
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    assert "tool results need a name" in response.json()["error"]["message"]
