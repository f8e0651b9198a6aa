"""Tool calls: the format a chat template writes them in, read back from answers, and forced by a grammar.

A format per template family, looked up by the text its template contains (no torch, no tokenizer here).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from services.engine.compact_json import COMPACT_JSON
from services.errors import InvalidRequestError


@dataclass(frozen=True)
class ToolCallFormat:
    """How one template family writes a call: `opening` JSON-object `closing`, calls separated by `separator`."""

    name: str
    opening: str
    closing: str
    separator: str = "\n"
    arguments_key: str = "arguments"
    unlike: tuple[str, ...] = ()  # text of templates that share the tag but write calls otherwise

    def taught_by(self, template: str) -> bool:
        """The template teaches this format: its tag, its JSON arguments key, none of another format's marks."""
        return (self.opening.strip() in template and f'"{self.arguments_key}"' in template
                and not any(mark in template for mark in self.unlike))


# Qwen2.5, Qwen3, SmolLM3 and the Hermes models: <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>
# (Qwen3-Coder's <function=...> and GLM's <arg_key> share the tag with XML inside)
HERMES = ToolCallFormat("hermes", opening="<tool_call>\n", closing="\n</tool_call>",
                        unlike=("<function=", "<arg_key>"))
FORMATS = (HERMES,)


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict  # a JSON schema of the arguments object


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = ""

    def as_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class ParsedAnswer:
    content: str | None
    calls: tuple[ToolCall, ...]


_PROBE_TOOL = {"type": "function", "function": {"name": "probe_tool", "description": "probe",
                                                 "parameters": {"type": "object", "properties": {}}}}


def template_tool_format(tokenizer) -> ToolCallFormat | str:
    """The call format of an HF tokenizer's chat template, or why it has none: a template renders tools when a
    tool changes what it writes, and shows its format by the opening tag it teaches the model."""
    messages = [{"role": "user", "content": "x"}]
    try:
        plain = tokenizer.apply_chat_template(messages, tokenize=False)
        with_tool = tokenizer.apply_chat_template(messages, tools=[_PROBE_TOOL], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that fails on tools does not support them
        with_tool = plain = None
    if with_tool == plain or "probe_tool" not in (with_tool or ""):
        return "this pair's chat template does not render tools, so its models cannot call them"
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else json.dumps(
        tokenizer.chat_template)  # a tokenizer may hold several named templates
    fmt = next((f for f in FORMATS if f.taught_by(template)), None)
    if fmt is None:
        return (f"this pair's chat template writes tool calls in a format this server does not read (it reads "
                f"{', '.join(f.name for f in FORMATS)})")
    if fmt.opening.strip() in getattr(tokenizer, "all_special_tokens", ()):
        return (f"this pair's tokenizer makes {fmt.opening.strip()} a special token, which decoding drops, so "
                "calls could not be read back")
    return fmt


def parse_answer(text: str, fmt: ToolCallFormat, declared: Collection[str] | None = None) -> ParsedAnswer:
    """The answer's text before its first call, and its calls. Every closed call must parse and name a declared
    tool (when `declared` is given), else the answer is text; an unclosed last call that does not parse (an
    answer cut at max_tokens) is dropped when calls before it parsed."""
    tag, end = fmt.opening.strip(), fmt.closing.strip()
    start = text.find(tag)
    if start < 0:
        return ParsedAnswer(text, ())
    calls, pieces = [], text[start:].split(tag)[1:]
    for number, piece in enumerate(pieces):
        closed = end in piece
        call = _call_from_json(piece.split(end, 1)[0].strip() if closed else piece.strip(), fmt, declared)
        if call is None and not closed and number == len(pieces) - 1 and calls:
            break
        if call is None:
            return ParsedAnswer(text, ())
        calls.append(call)
    content = text[:start].strip()
    return ParsedAnswer(content or None, tuple(calls))


def _call_from_json(body: str, fmt: ToolCallFormat, declared: Collection[str] | None) -> ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    if declared is not None and value["name"] not in declared:  # OpenAI never answers an undeclared tool
        return None
    arguments = value.get(fmt.arguments_key, {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False), f"call_{uuid.uuid4().hex[:24]}")


class ToolCallStream:
    """One streamed answer: its text is passed on until a call may begin; from there it is held to the end."""

    def __init__(self, fmt: ToolCallFormat, declared: Collection[str] | None = None):
        self.fmt, self.declared, self.text, self.sent = fmt, declared, "", 0
        self.tag = fmt.opening.strip()

    def feed(self, piece: str) -> str:
        """The part of the text so far that cannot be the start of a call and was not passed on yet."""
        self.text += piece
        start = self.text.find(self.tag, max(0, self.sent - len(self.tag)))
        safe = start if start >= 0 else len(self.text) - _partial_tag(self.text, self.tag)
        out = self.text[self.sent:safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return out

    def finish(self) -> tuple[str, tuple[ToolCall, ...]]:
        """At the end: the text still held (when it held no call that parses), and the calls."""
        parsed = parse_answer(self.text, self.fmt, self.declared)
        if parsed.calls:
            return "", parsed.calls
        rest, self.sent = self.text[self.sent:], len(self.text)
        return rest, ()


def _partial_tag(text: str, tag: str) -> int:
    """How many trailing characters of `text` begin `tag` (they may be a tag still arriving)."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


def forced_calls_grammar(fmt: ToolCallFormat, tools: Sequence[Tool], name: str | None = None,
                         parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect, JSON schemas inline) of answers that are only calls: to the tool
    `name`, or to any of `tools`; one call, or several when `parallel` and no name is forced."""
    chosen = [tool for tool in tools if name is None or tool.name == name]
    if not chosen:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not in tools", param="tool_choice")
    definitions, schemas = {}, []
    for number, tool in enumerate(chosen):
        parameters, own = _hoisted(tool.parameters, f"tool{number}_")
        definitions.update(own)
        schemas.append({"type": "object", "properties": {"name": {"const": tool.name}, fmt.arguments_key: parameters},
                        "required": ["name", fmt.arguments_key], "additionalProperties": False})
    schema = {"x-guidance": COMPACT_JSON, **(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})}
    if definitions:
        schema["$defs"] = definitions
    repeat = f" ({json.dumps(fmt.separator)} call)*" if parallel and name is None else ""
    return (f"start: call{repeat}\n"
            f"call: {json.dumps(fmt.opening)} %json {json.dumps(schema)} {json.dumps(fmt.closing)}\n")


_DEFINITIONS = ("$defs", "definitions")


def _hoisted(parameters: dict, prefix: str) -> tuple[dict, dict]:
    """A tool's schema without its definitions, and those definitions renamed with `prefix`: nested under the
    call's `arguments`, its `#/$defs/...` references must point at the root's (as pydantic writes them)."""
    definitions = {f"{prefix}{name}": schema for key in _DEFINITIONS
                   for name, schema in parameters.get(key, {}).items()}
    body = {key: value for key, value in parameters.items() if key not in _DEFINITIONS}
    return _renamed_refs(body, prefix), _renamed_refs(definitions, prefix)


def _renamed_refs(value, prefix: str):
    if isinstance(value, dict):
        return {key: _renamed_ref(item, prefix) if key == "$ref" and isinstance(item, str) else
                _renamed_refs(item, prefix) for key, item in value.items()}
    if isinstance(value, list):
        return [_renamed_refs(item, prefix) for item in value]
    return value


def _renamed_ref(ref: str, prefix: str) -> str:
    for key in _DEFINITIONS:
        if ref.startswith(f"#/{key}/"):
            return f"#/$defs/{prefix}{ref[len(key) + 3:]}"
    return ref
