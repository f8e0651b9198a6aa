"""Row bookkeeping shared by every batch: a request's `Sequence`, and `RowBatch`, which chooses each row's
token (logit processors, grammar masks, sampling), accepts it (stop strings, log-probs, finishing) and keeps
the rows' attention mask and positions. It holds no model, cache or decoder: `FamilyBatch` runs the model."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.engine.detokenize import TextTracker
from services.engine.interface import SamplingParams, StreamDelta, TokenLogprob
from services.engine.logit_processors import apply_logit_processors
from services.engine.sampling import choose_token, is_greedy, make_generator
from services.engine.scoring import top_by_text
from services.engine.structured import apply_grammar_masks


@dataclass
class Sequence:
    """A request's state inside the engine; `emit` is thread-safe and delivers deltas to the caller."""

    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[StreamDelta | BaseException], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: bool = False
    tracker: TextTracker | None = None
    generator: torch.Generator | None = None
    num_layers: int | None = None  # the size asked for
    matcher: object | None = None  # the grammar an answer must follow (structured output), if any

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled.is_set()


def _top_logprobs(logprobs: torch.Tensor, k: int, tokenizer) -> dict[str, float]:
    """The k likeliest tokens of one row of log-probs [vocab] as {text: logprob} (already normalised)."""
    return top_by_text(logprobs[None], logprobs.new_zeros(1), k, tokenizer.decode)[0]


class RowBatch:
    """Sequences that advance together, one row each; finished rows idle until the batch ends (or leave at a
    join). Subclasses run the model: `prefill` (or `start_prefill` and `prefill_chunk`, which the scheduler
    calls) and `step` end in `_advance(logits)`."""

    joinable = False  # whether new sequences may join between steps (`join`)

    def __init__(self, sequences: list[Sequence], tokenizer, eos_ids: set[int], pad_id: int,
                 device: torch.device):
        self.sequences, self.tokenizer = sequences, tokenizer
        self.eos_ids, self.pad_id, self.device = eos_ids, pad_id, device
        self.attention_mask: torch.Tensor | None = None  # [batch, seen]
        self.positions: torch.Tensor | None = None  # [batch, 1]
        self.next_tokens: torch.Tensor | None = None  # [batch]
        for seq in sequences:
            seq.tracker = TextTracker(tokenizer, seq.params.stop)
            seq.generator = make_generator(seq.params.seed, device)

    @property
    def done(self) -> bool:
        return all(seq.done for seq in self.sequences)

    def release(self) -> None:
        """Called once the batch has left the scheduler; buffers from a pool go back to it (none here)."""

    def _left_padded_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, position_ids), both [batch, longest]; sets the attention mask and last positions."""
        longest = max(len(seq.prompt_ids) for seq in self.sequences)
        rows = [[self.pad_id] * (longest - len(s.prompt_ids)) + s.prompt_ids for s in self.sequences]
        masks = [[0] * (longest - len(s.prompt_ids)) + [1] * len(s.prompt_ids) for s in self.sequences]
        input_ids = torch.tensor(rows, device=self.device)  # [batch, longest]
        self.attention_mask = torch.tensor(masks, device=self.device)  # [batch, longest]
        position_ids = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)  # [batch, longest]
        self.positions = position_ids[:, -1:]  # [batch, 1]
        return input_ids, position_ids

    def _next_input(self) -> torch.Tensor:
        """The tokens chosen last step, [batch, 1]; extends the attention mask and advances the positions."""
        input_ids = self.next_tokens[:, None]  # [batch, 1]
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(input_ids)], dim=1)
        self.positions = self.positions + 1  # [batch, 1]
        return input_ids

    def _choose(self, logits: torch.Tensor) -> list[int]:
        """One token per row, after the rows' logit adjustments; a single argmax for the whole batch when every
        row is greedy."""
        logits = apply_logit_processors(logits, [seq.params for seq in self.sequences],
                                        [seq.prompt_ids for seq in self.sequences],
                                        [seq.tracker.token_ids for seq in self.sequences], self.eos_ids)
        logits = apply_grammar_masks(logits, [seq.matcher for seq in self.sequences])
        if all(is_greedy(seq.params) for seq in self.sequences):
            return logits.argmax(-1).tolist()
        return [choose_token(logits[row], seq.params, seq.generator) for row, seq in enumerate(self.sequences)]

    def _advance(self, logits: torch.Tensor) -> None:
        tokens = self._choose(logits)
        self.next_tokens = torch.tensor(tokens, device=self.device)  # [batch]
        wants_logprobs = any(seq.params.logprobs is not None for seq in self.sequences)
        logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None  # [batch, vocab]
        self._accept_rows(tokens, logprobs)

    def _accept_rows(self, tokens: list[int], logprobs: torch.Tensor | None = None) -> None:
        """Each live row takes its token (logprobs [batch, vocab] where asked for)."""
        for row, seq in enumerate(self.sequences):
            if not seq.done:
                self._accept(seq, tokens[row], None if logprobs is None else logprobs[row])

    def _accept(self, seq: Sequence, token: int, logprobs: torch.Tensor | None) -> None:
        params, tracker = seq.params, seq.tracker
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
        info = ()
        if params.logprobs is not None:
            top = _top_logprobs(logprobs, params.logprobs, self.tokenizer) if params.logprobs else {}
            info = (TokenLogprob(self.tokenizer.decode([token]), float(logprobs[token]), top),)
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            text = tracker.flush()
            tracker.token_ids.append(token)  # counted in the usage, never shown
            return self._finish(seq, text, "stop", info)
        text, stopped = tracker.push(token)
        if stopped:
            return self._finish(seq, text, "stop", info, token)
        if len(tracker.token_ids) >= params.max_tokens:
            return self._finish(seq, text + tracker.flush(), "length", info, token)
        seq.emit(StreamDelta(text, (token,), info, None, len(seq.prompt_ids), len(tracker.token_ids)))

    def _finish(self, seq: Sequence, text: str, reason: str, info, token: int | None = None) -> None:
        seq.finished = True
        token_ids = (token,) if token is not None else ()
        seq.emit(StreamDelta(text, token_ids, info, reason, len(seq.prompt_ids), len(seq.tracker.token_ids)))
