"""Incremental detokenisation: emit only complete UTF-8 text, hold back what could start a stop string.

Each token decodes a short window (the last few tokens), not the whole sequence, so the cost per token
stays constant however long the generation runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

REPLACEMENT = "\ufffd"
WINDOW = 6  # tokens of left context decoded with each new token (merges and byte tokens need some)


def text_decoder(tokenizer) -> Callable[[list[int]], str]:
    """`tokenizer.decode(ids, skip_special_tokens=True)`, sent straight to the Rust tokenizer where that is
    all the wrapper would do (a fast tokenizer without clean-up): the wrapper's Python costs ~20 µs a call,
    and detokenising takes two calls per token of every sequence."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "decode") and getattr(tokenizer, "clean_up_tokenization_spaces",
                                                                      True) is False:
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


@dataclass
class TextTracker:
    """Turns a growing list of token ids into safe text deltas and finds stop strings."""

    tokenizer: object
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # complete text decoded so far
    sent: int = 0  # characters of `text` already emitted
    prefix_offset: int = 0
    read_offset: int = 0

    def __post_init__(self) -> None:
        self._decode = text_decoder(self.tokenizer)

    def _advance(self) -> None:
        """Append the newly complete text (if any) from the tokens after `read_offset`."""
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        current = self._decode(self.token_ids[self.prefix_offset:])
        if len(current) > len(prefix) and not current.endswith(REPLACEMENT):
            self.text += current[len(prefix):]
            self.read_offset = len(self.token_ids)
            self.prefix_offset = max(0, self.read_offset - WINDOW)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (text to emit now, whether a stop string ended the sequence)."""
        self.token_ids.append(token_id)
        self._advance()
        for stop in self.stop:
            at = self.text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                return self._emit(at), True
        holdback = max((len(s) - 1 for s in self.stop), default=0)
        return self._emit(max(self.sent, len(self.text) - holdback)), False

    def flush(self) -> str:
        """Everything not yet emitted, at the end of the sequence (an incomplete character included)."""
        tail = self._decode(self.token_ids[self.prefix_offset:])
        prefix = self._decode(self.token_ids[self.prefix_offset:self.read_offset])
        self.text += tail[len(prefix):]
        self.read_offset = len(self.token_ids)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        delta = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return delta
