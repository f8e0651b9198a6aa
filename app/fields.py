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
    "functions": ([],),
    "function_call": ("none",),
    "modalities": (["text"],),
}
HARMLESS = frozenset({  # cannot change the answer: dropped with a warning
    "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier", "reasoning_effort",
})
# the same for the fields of one chat message (a client sending back an assistant message adds the empty ones)
MESSAGE_NEUTRAL: dict[str, tuple] = {"annotations": ([],)}
MESSAGE_HARMLESS = frozenset({"refusal"})  # the chat template never reads it
CONTENT_PARTS = ("text",)  # the kinds of content part a message may hold


def _first_refused(extra: dict, neutral: dict[str, tuple], harmless: frozenset,
                   where: str) -> tuple[str, str] | None:
    """The first field of `extra` we cannot honour and why; warns of those we drop."""
    for name, value in extra.items():
        if value is None or (name in neutral and value in neutral[name]):
            continue
        if name in harmless:
            log.warning("%s field %r is not used; ignored", where, name)
            continue
        return name, "is not supported" if name in neutral else f"is not a field of this {where}"
    return None


def check_extra_fields(extra: dict) -> None:
    """Raises a validation error naming the first field we cannot honour; warns of those we drop."""
    refused = _first_refused(extra, NEUTRAL, HARMLESS, "request")
    if refused is not None:
        raise PydanticCustomError("unsupported_field", "{param} {reason}", {"param": refused[0], "reason": refused[1]})


def _refused_in_messages(reason: str) -> PydanticCustomError:
    return PydanticCustomError("unsupported_field", "{param}: {reason}", {"param": "messages", "reason": reason})


def check_message(extra: dict, content) -> None:
    """The same for one chat message: its extra fields, and content parts other than text (images, audio)."""
    refused = _first_refused(extra, MESSAGE_NEUTRAL, MESSAGE_HARMLESS, "message")
    if refused is not None:
        raise _refused_in_messages(" ".join(refused))
    for part in content if isinstance(content, list) else ():
        if part.get("type") not in CONTENT_PARTS:
            raise _refused_in_messages(f"content parts of type {part.get('type')!r} are not supported "
                                       f"(this server reads {', '.join(CONTENT_PARTS)} only)")
