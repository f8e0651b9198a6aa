"""Request fields the OpenAI API defines that we do not implement: refused, never dropped in silence.

A field that would change the answer is accepted only at the value that changes nothing (a client library
that always sends `best_of: 1` keeps working); any other value is answered with 400 naming the field.
Fields that cannot change the answer are dropped with a logged warning. A field nobody defines is refused.
"""

from __future__ import annotations

import logging

from pydantic_core import PydanticCustomError

log = logging.getLogger("boomerang.requests")

NEUTRAL: dict[str, tuple] = {  # not implemented: accepted only at these values
    "best_of": (1,),
    "suffix": ("",),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none", "auto"),  # with no tools, either changes nothing
    "function_call": ("none",),
    "modalities": (["text"],),
}
HARMLESS = frozenset({  # cannot change the answer: dropped with a warning
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "parallel_tool_calls",
    "reasoning_effort",
})
# the same for the fields of one chat message (a client sending back an assistant message adds the empty ones)
MESSAGE_NEUTRAL: dict[str, tuple] = {"tool_calls": ([],), "annotations": ([],), "tool_call_id": ("",)}
MESSAGE_HARMLESS = frozenset({"name", "refusal"})  # the chat template never reads them
CONTENT_PARTS = ("text",)  # the kinds of content part a message may hold


def check_extra_fields(extra: dict) -> None:
    """Raises a validation error naming the first field we cannot honour; warns of those we drop."""
    for name, value in extra.items():
        if value is None or (name in NEUTRAL and value in NEUTRAL[name]):
            continue
        if name in HARMLESS:
            log.warning("request field %r is not used; ignored", name)
            continue
        reason = "is not supported" if name in NEUTRAL else "is not a field of this endpoint"
        raise PydanticCustomError("unsupported_field", "{param} {reason}", {"param": name, "reason": reason})


def _refused_in_messages(reason: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported_field", "{param}: {reason}", {"param": "messages", "reason": reason})


def check_message(extra: dict, content) -> None:
    """The same for one chat message: its extra fields, and content parts other than text (images, audio)."""
    for name, value in extra.items():
        if value is None or (name in MESSAGE_NEUTRAL and value in MESSAGE_NEUTRAL[name]):
            continue
        if name in MESSAGE_HARMLESS:
            log.warning("message field %r is not used; ignored", name)
            continue
        reason = "is not supported" if name in MESSAGE_NEUTRAL else "is not a field of a message"
        raise _refused_in_messages(f"{name} {reason}")
    for part in content if isinstance(content, list) else ():
        if part.get("type") not in CONTENT_PARTS:
            raise _refused_in_messages(f"content parts of type {part.get('type')!r} are not supported "
                                       f"(this server reads {', '.join(CONTENT_PARTS)} only)")
