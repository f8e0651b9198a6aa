"""Tools in a chat request: whether the template renders them, the grammar that forces a call, and the answer's
calls read back into OpenAI's `tool_calls` (whole, or at the end of a stream)."""

from __future__ import annotations

from dataclasses import dataclass

from app.schemas import ChatMessage, ChatRequest
from services.engine.interface import Engine, StructuredOutput
from services.engine.tool_calls import (
    Tool,
    ToolCall,
    ToolCallFormat,
    ToolCallStream,
    forced_calls_grammar,
    parse_answer,
)

ANY_ARGUMENTS = {"type": "object", "properties": {}}  # a function declared without parameters


def finished_by_calls(finish_reason: str | None) -> str | None:
    """An answer that called tools and ended by itself ends with `tool_calls`; one cut short keeps its reason."""
    return "tool_calls" if finish_reason == "stop" else finish_reason


def check_history(messages: list[ChatMessage], engine: Engine) -> None:
    """Earlier calls and their results can only be rendered by a template that has tools (else 400)."""
    if any(message.tool_calls or message.tool_call_id for message in messages):
        engine.tool_call_format("messages")


@dataclass(frozen=True)
class ChatToolCalls:
    """One request's tools; `fmt` None when its answers are plain text (no tools, or tool_choice none)."""

    req: ChatRequest
    fmt: ToolCallFormat | None

    @classmethod
    def of(cls, req: ChatRequest, engine: Engine) -> ChatToolCalls:
        """Refuses (400) tools, or earlier calls in the messages, where the pair's template has no tools."""
        check_history(req.messages, engine)
        return cls(req, engine.tool_call_format("tools") if req.calls_tools() else None)

    def rendered_tools(self) -> list[dict] | None:
        """The tools as HF chat templates take them; with tool_choice none the model is not shown them."""
        if self.fmt is None:
            return None
        tools = [tool.model_dump(exclude_none=True) for tool in self.req.tools]
        for tool in tools:  # templates read parameters.properties
            tool["function"].setdefault("parameters", dict(ANY_ARGUMENTS))
        return tools

    def grammar(self) -> StructuredOutput | None:
        """For tool_choice required or a named function: answers that are calls and nothing else."""
        choice = self.req.choice_of_tool()
        if self.fmt is None or choice not in ("required", "named"):
            return None
        name = self.req.tool_choice.function.name if choice == "named" else None
        tools = [Tool(t.function.name, t.function.parameters or ANY_ARGUMENTS) for t in self.req.tools]
        text = forced_calls_grammar(self.fmt, tools, name, parallel=self.parallel())
        return StructuredOutput("lark", text, "tool_choice")

    def declared(self) -> set[str]:
        return {tool.function.name for tool in self.req.tools or ()}

    def parallel(self) -> bool:
        """Several calls per answer, unless parallel_tool_calls is false (null or absent: OpenAI's default)."""
        return self.req.parallel_tool_calls is not False

    def kept(self, calls: tuple[ToolCall, ...]) -> tuple[ToolCall, ...]:
        """With parallel_tool_calls false, the first call only."""
        return calls if self.parallel() else calls[:1]

    def message(self, text: str, finish_reason: str | None) -> dict:
        """A whole answer's `message` and `finish_reason` (tool_calls where it called and ended by itself)."""
        calls = parse_answer(text, self.fmt, self.declared()) if self.fmt is not None else None
        if calls is None or not calls.calls:
            return {"message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        return {"message": {"role": "assistant", "content": calls.content,
                            "tool_calls": [call.as_openai() for call in self.kept(calls.calls)]},
                "finish_reason": finished_by_calls(finish_reason)}

    def stream(self) -> ChatDeltas:
        return ChatDeltas(self, ToolCallStream(self.fmt, self.declared()) if self.fmt is not None else None)


@dataclass
class ChatDeltas:
    """One streamed choice: text passes as it comes, except from where a call may begin; the calls come as one
    `tool_calls` delta with the last chunk."""

    calls: ChatToolCalls
    held: ToolCallStream | None

    def delta(self, text: str, finish_reason: str | None) -> dict:
        if self.held is None:
            return {"delta": {"content": text}}
        content = self.held.feed(text)
        if finish_reason is None:
            return {"delta": {"content": content}}
        rest, calls = self.held.finish()
        out: dict = {"delta": {"content": content + rest}}
        if calls:
            out["delta"]["tool_calls"] = [call.as_openai(i) for i, call in enumerate(self.calls.kept(calls))]
            out["finish_reason"] = finished_by_calls(finish_reason)
        return out
