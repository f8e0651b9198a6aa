"""Request and response bodies: the OpenAI API's, plus native generate/score/tokenize."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from app.fields import check_extra_fields, check_message
from services.bounds import PENALTY_BOUNDS
from services.engine.interface import StructuredOutput

MAX_STOP_LENGTH = 256
PromptText = Annotated[str, Field(min_length=1, max_length=1_000_000)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=2**31 - 1)]], Field(min_length=1)]


UNSET_IS_THE_PAIR_S = "unset: the pair's default (`sampling_defaults` on GET /v1/models), else off"


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


def _json_or_none(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


class JsonSchemaFormat(BaseModel):
    name: str | None = None
    description: str | None = None
    schema_: dict = Field(..., alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a json_schema")
        return self


class SamplingFields(BaseModel):
    """Fields shared by every generating endpoint; any other field is checked by `app.fields`."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(None, description="a size id from /v1/models, or the family id (the teacher)")
    num_layers: Annotated[int, Field(ge=1, le=100_000)] | Literal["auto"] | None = Field(
        None, description="the size as a layer count, or auto: the largest that fits the budget")
    max_latency_ms: float | None = Field(None, gt=0, description="auto: time to the whole answer")
    max_time_to_first_token_ms: float | None = Field(None, gt=0, description="auto: time to the first token")
    min_num_layers: int | None = Field(None, ge=1, le=100_000, description="auto: the smallest size accepted")
    allow_smaller: bool = Field(False, description="with --overload-policy degrade: may be served smaller")
    max_tokens: int | None = Field(None, ge=0, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, le=1_000_000, description="0 or -1: off")
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token")
    presence_penalty: float | None = Field(None, **PENALTY_BOUNDS["presence_penalty"].pydantic(),
                                           description=UNSET_IS_THE_PAIR_S)
    frequency_penalty: float | None = Field(None, **PENALTY_BOUNDS["frequency_penalty"].pydantic(),
                                            description=UNSET_IS_THE_PAIR_S)
    repetition_penalty: float | None = Field(None, **PENALTY_BOUNDS["repetition_penalty"].pydantic(),
                                             description="1: off; " + UNSET_IS_THE_PAIR_S)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    logit_bias: dict[Annotated[int, Field(ge=0, le=2**31 - 1)], Annotated[float, Field(ge=-100, le=100)]] | None = (
        Field(None, description="token id -> added to its logit"))
    stop_token_ids: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(None, max_length=1024)
    min_tokens: int = Field(0, ge=0, le=1_000_000)
    response_format: ResponseFormat | None = Field(None, description="json_object or json_schema: the answer parses")
    guided_json: dict | str | None = Field(None, description="vLLM's name: a JSON schema the answer follows")
    guided_regex: str | None = Field(None, max_length=10_000, description="vLLM's name: a regex the answer matches")

    def _structured_asks(self) -> list[str]:
        return [name for name, given in (
            ("response_format", self.response_format is not None and self.response_format.type != "text"),
            ("guided_json", self.guided_json is not None), ("guided_regex", self.guided_regex is not None)) if given]

    def structured(self) -> StructuredOutput | None:
        """The grammar asked for, as the engine takes it (at most one way is given: see the validator)."""
        if self.guided_regex is not None:
            return StructuredOutput("regex", self.guided_regex, "guided_regex")
        if self.guided_json is not None:
            text = self.guided_json if isinstance(self.guided_json, str) else json.dumps(self.guided_json)
            return StructuredOutput("json_schema", text, "guided_json")
        if self._structured_asks():
            if self.response_format.type == "json_object":
                return StructuredOutput("json_object", "", "response_format")
            return StructuredOutput("json_schema", json.dumps(self.response_format.json_schema.schema_),
                                    "response_format")
        return None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if any(not s or len(s) > MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"stop strings must be 1 to {MAX_STOP_LENGTH} characters")
        return value

    @model_validator(mode="after")
    def _no_silent_drops(self):
        check_extra_fields(self.model_extra or {})
        asked = self._structured_asks()
        if len(asked) > 1:
            raise PydanticCustomError("unsupported_field", "{param} cannot be combined with {other}",
                                      {"param": asked[1], "other": asked[0]})
        if asked and self.min_tokens:  # a complete answer may only end: barring the end leaves no token
            raise PydanticCustomError("unsupported_field", "{param} cannot be combined with {other}",
                                      {"param": "min_tokens", "other": asked[0]})
        if isinstance(self.guided_json, str) and not isinstance(_json_or_none(self.guided_json), dict):
            raise PydanticCustomError("unsupported_field", "{param} must be a JSON schema object",
                                      {"param": "guided_json"})
        return self

    def stop_list(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(SamplingFields):
    prompt: PromptText | Annotated[list[PromptText], Field(min_length=1)] | TokenIds | Annotated[
            list[TokenIds], Field(min_length=1)] = Field(
        ..., description="text, a list of texts, token ids, or a list of token-id lists")
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class CalledFunction(BaseModel):
    name: FunctionName
    arguments: str = Field(..., max_length=1_000_000, description="a JSON object")

    @field_validator("arguments")
    @classmethod
    def _a_json_object(cls, value: str) -> str:
        if not isinstance(_json_or_none(value), dict):
            raise PydanticCustomError("unsupported_field", "{param}: tool call arguments must be a JSON object",
                                      {"param": "messages"})
        return value


class MessageToolCall(BaseModel):
    """A call an earlier assistant turn made, sent back with the conversation."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None
    tool_calls: list[MessageToolCall] | None = Field(None, max_length=128)
    tool_call_id: str | None = Field(None, description="on a tool message: the call it answers")
    name: str | None = Field(None, max_length=256, description="passed to the chat template (some read it on "
                             "tool results)")

    @model_validator(mode="after")
    def _no_silent_drops(self):
        check_message(self.model_extra or {}, self.content)
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""

    def for_template(self) -> dict:
        """As HF chat templates read a message: tool call arguments as objects, as vLLM passes them."""
        message = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                "name": call.function.name, "arguments": json.loads(call.function.arguments)}}
                for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.name:
            message["name"] = self.name
        return message


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """The conversation as HF chat templates read it; a tool result sent without `name` gets the name of the call
    it answers (Hermes-style templates require it)."""
    called = {call.id: call.function.name for m in messages for call in m.tool_calls or () if call.id}
    rendered = [m.for_template() for m in messages]
    for message in rendered:
        if message["role"] == "tool" and "name" not in message and message.get("tool_call_id") in called:
            message["name"] = called[message["tool_call_id"]]
    return rendered


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: FunctionName
    description: str | None = None
    parameters: dict | None = Field(None, description="a JSON schema of the arguments object")
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _an_object(cls, value: dict | None) -> dict | None:
        if value is not None and value.get("type", "object") != "object":
            raise PydanticCustomError("unsupported_field", "{param}: a function's parameters must be an object "
                                      "schema", {"param": "tools"})
        return value


class ToolDefinition(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: FunctionName


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=0, le=1_000_000)
    tools: list[ToolDefinition] | None = Field(None, max_length=128, description="functions the model may call")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="auto (the default with tools), none, required, or one function by name")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one call per answer")

    def choice_of_tool(self) -> str:
        """none, auto, required or named: what the answer may do with `tools`."""
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or ("auto" if self.tools else "none")

    def calls_tools(self) -> bool:
        return bool(self.tools) and self.choice_of_tool() != "none"

    @model_validator(mode="after")
    def _tools_consistent(self):
        choice = self.choice_of_tool()
        if choice in ("required", "named") and not self.tools:
            raise PydanticCustomError("unsupported_field", "{param} {reason}",
                                      {"param": "tool_choice", "reason": f"is {choice} but no tools are given"})
        names = [tool.function.name for tool in self.tools or ()]
        if choice == "named" and self.tool_choice.function.name not in names:
            raise PydanticCustomError("unsupported_field", "{param} {reason}", {
                "param": "tool_choice", "reason": f"names {self.tool_choice.function.name!r}, which is not in tools"})
        if len(set(names)) < len(names):
            raise PydanticCustomError("unsupported_field", "{param} {reason}",
                                      {"param": "tools", "reason": "name the same function twice"})
        if choice in ("required", "named") and self.min_tokens:  # a forced call may only end once complete
            raise PydanticCustomError("unsupported_field", "{param} cannot be combined with {other}",
                                      {"param": "min_tokens", "other": f"tool_choice {choice}"})
        if self.calls_tools() and self._structured_asks():
            raise PydanticCustomError("unsupported_field", "{param} cannot be combined with {other}",
                                      {"param": self._structured_asks()[0], "other": "tools"})
        return self


class GenerateRequest(SamplingFields):
    """Native generation: text in, text out."""

    prompt: PromptText = Field(..., min_length=1)
    logprobs: int | None = Field(None, ge=0, le=20)


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    text: PromptText = Field(..., min_length=1)
    model: str | None = None
    num_layers: int | None = Field(None, ge=1, le=100_000)
    top_logprobs: int = Field(0, ge=0, le=20)


class TokenizeRequest(BaseModel):
    """vLLM's shape: a `prompt` or chat `messages`; `text` is kept as an alias of `prompt`."""

    model: str | None = None
    prompt: Annotated[str, Field(max_length=1_000_000)] | None = None
    text: Annotated[str, Field(max_length=1_000_000)] | None = Field(None, description="alias of prompt")
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = Field(False, description="as /v1/completions tokenizes prompts")
    add_generation_prompt: bool = Field(True, description="with messages: end with the assistant's header")
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        given = [name for name in ("prompt", "text", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of prompt, text or messages")
        return self


class DetokenizeRequest(BaseModel):
    tokens: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(..., max_length=1_000_000)
    model: str | None = None


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "boomerang"
    num_layers: int
    patched_blocks: int
    parameters: int
    bytes: int
    quality: dict = Field(default_factory=dict)
    speed: dict = Field(default_factory=dict, description="current estimates, learned from requests served")
    max_model_len: int
    sampling_defaults: dict = Field(default_factory=dict, description="what a request that sets none of these "
                                    "fields gets (the pair's choice; a request's own value wins)")
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelEntry]


class ScoreResponse(BaseModel):
    model: str
    num_layers: int
    tokens: list[str]
    token_ids: list[int]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None = None
    total_logprob: float
    perplexity: float | None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
    text: str = Field(..., description="the same as prompt, for clients of earlier versions")
