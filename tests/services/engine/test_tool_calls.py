"""Tool calls: the template's format found, answers read back (whole and streamed), calls forced by a grammar."""

import json

import pytest

from services.engine.interface import StructuredOutput
from services.engine.structured import GrammarCompiler
from services.engine.tool_calls import (
    HERMES,
    Tool,
    ToolCallStream,
    forced_calls_grammar,
    parse_answer,
    template_tool_format,
)
from services.errors import InvalidRequestError
from tests.conftest import CHAT_TEMPLATE, HERMES_TEMPLATE, make_tokenizer

TWO_CALLS = ('Let me look.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "time", "arguments": "{\\"zone\\": \\"CET\\"}"}\n</tool_call>')
WEATHER = Tool("weather", {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}},
                           "required": ["city"], "additionalProperties": False})
TIME = Tool("time", {"type": "object", "properties": {"zone": {"enum": ["CET", "UTC"]}}, "required": ["zone"]})


def test_an_answer_s_calls_and_the_text_before_them_are_read_back():
    parsed = parse_answer(TWO_CALLS, HERMES)
    assert parsed.content == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.calls] == [("weather", {"city": "Paris"}),
                                                                         ("time", {"zone": "CET"})]
    assert len({c.id for c in parsed.calls}) == 2 and all(c.id.startswith("call_") for c in parsed.calls)
    unclosed = parse_answer('<tool_call>\n{"name": "weather", "arguments": {}}', HERMES)
    assert unclosed.content is None and unclosed.calls[0].name == "weather"
    cut = parse_answer(TWO_CALLS[:TWO_CALLS.rindex("CET")], HERMES)  # the second call cut by max_tokens
    assert [c.name for c in cut.calls] == ["weather"]
    assert parse_answer(TWO_CALLS, HERMES, declared={"weather"}).calls == ()  # "time" was never declared


@pytest.mark.parametrize("text", ["plain words", "<tool_call>\n{not json}\n</tool_call>",
                                  '<tool_call>\n{"arguments": {}}\n</tool_call>',
                                  '<tool_call>\n{"name": "f", "arguments": [1]}\n</tool_call>'])
def test_an_answer_whose_calls_do_not_parse_is_text(text):
    parsed = parse_answer(text, HERMES)
    assert parsed.content == text and parsed.calls == ()


@pytest.mark.parametrize("text", [TWO_CALLS, "no call at all <tool", "a < b and <tool_c but no call",
                                  "<tool_call>\n{broken"])
def test_a_streamed_answer_passes_text_until_a_call_may_begin(text):
    stream = ToolCallStream(HERMES)
    passed = "".join(stream.feed(char) for char in text)
    rest, calls = stream.finish()
    whole = parse_answer(text, HERMES)
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole.calls]
    if calls:
        assert passed.strip() == whole.content and "<tool" not in passed and rest == ""
    else:
        assert passed + rest == text


def test_the_template_says_whether_and_how_it_renders_tools():
    assert template_tool_format(make_tokenizer(chat_template=HERMES_TEMPLATE)) is HERMES
    assert "does not render tools" in template_tool_format(make_tokenizer(chat_template=CHAT_TEMPLATE))
    other = CHAT_TEMPLATE + "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}{% endif %}"
    assert "format this server does not read" in template_tool_format(make_tokenizer(chat_template=other))
    coder = HERMES_TEMPLATE.replace("<args-json-object>}", "<args-json-object>}<function=name>")
    assert "format this server does not read" in template_tool_format(make_tokenizer(chat_template=coder))
    special = make_tokenizer(chat_template=HERMES_TEMPLATE)
    special.add_special_tokens({"additional_special_tokens": ["<tool_call>"]})
    assert "special token" in template_tool_format(special)


def _matcher(grammar: str):
    tokenizer = make_tokenizer()
    grammars = GrammarCompiler(tokenizer, len(tokenizer))
    return tokenizer, grammars.matcher(StructuredOutput("lark", grammar, "tool_choice"))


def _accepts(grammar: str, text: str) -> bool:
    tokenizer, matcher = _matcher(grammar)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return matcher.consume_tokens(ids) and not matcher.is_error() and matcher.is_accepting()


def test_a_forced_call_follows_the_named_tool_s_schema():
    named = forced_calls_grammar(HERMES, [WEATHER, TIME], "weather")
    call = '<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    assert _accepts(named, call)
    assert not _accepts(named, call.replace("Rome", "Oslo"))
    assert not _accepts(named, '<tool_call>\n{"name": "time", "arguments": {"zone": "CET"}}\n</tool_call>')
    assert not _accepts(named, call + "\n" + call)  # a named choice is one call


def test_required_calls_any_tool_and_several_only_when_parallel():
    first = '<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    second = '<tool_call>\n{"name": "time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    assert _accepts(forced_calls_grammar(HERMES, [WEATHER, TIME]), first + "\n" + second)
    assert not _accepts(forced_calls_grammar(HERMES, [WEATHER, TIME], parallel=False), first + "\n" + second)
    assert not _accepts(forced_calls_grammar(HERMES, [WEATHER, TIME]), "Sure! " + first)
    with pytest.raises(InvalidRequestError) as unknown:
        forced_calls_grammar(HERMES, [WEATHER], "nowhere")
    assert unknown.value.param == "tool_choice"


def test_a_schema_with_definitions_keeps_its_references_when_nested_under_the_call():
    """pydantic writes nested models as `$defs` with `#/$defs/...` references from the schema's root."""
    place = Tool("place", {"$defs": {"City": {"type": "object", "properties": {"name": {"enum": ["Oslo", "Rome"]}},
                                              "required": ["name"], "additionalProperties": False}},
                           "type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"],
                           "additionalProperties": False})
    grammar = forced_calls_grammar(HERMES, [WEATHER, place], "place")
    call = '<tool_call>\n{"name": "place", "arguments": {"city": {"name": "Oslo"}}}\n</tool_call>'
    assert _accepts(grammar, call)
    assert not _accepts(grammar, call.replace("Oslo", "Lima"))
