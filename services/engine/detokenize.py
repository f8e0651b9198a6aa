"""Incremental detokenisation: emit only complete UTF-8 text, hold back what could start a stop string."""

from __future__ import annotations

from dataclasses import dataclass, field

REPLACEMENT = "\ufffd"


@dataclass
class TextTracker:
    """Turns a growing list of token ids into safe text deltas and finds stop strings."""

    tokenizer: object
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of text already emitted

    def text(self) -> str:
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns (text to emit now, whether a stop string ended the sequence)."""
        self.token_ids.append(token_id)
        text = self.text()
        for stop in self.stop:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                return self._emit(text[:at]), True
        if text.endswith(REPLACEMENT):  # a multi-byte character is still incomplete
            return "", False
        holdback = max((len(s) - 1 for s in self.stop), default=0)
        return self._emit(text[: max(self.sent, len(text) - holdback)]), False

    def flush(self) -> str:
        """Everything not yet emitted, at the end of the sequence."""
        return self._emit(self.text())

    def _emit(self, upto: str) -> str:
        delta = upto[self.sent:]
        self.sent = max(self.sent, len(upto))
        return delta
