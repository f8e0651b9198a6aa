"""One batch of sequences on one variant: left-padded prefill, then one decode step at a time."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from services.engine.decoder_step import decoder_step
from services.engine.detokenize import TextTracker
from services.engine.interface import GREEDY_STEPS, SamplingParams, StreamDelta, TokenLogprob
from services.engine.logit_processors import adjusts_logits, apply_logit_processors
from services.engine.sampling import choose_token, is_greedy, make_generator
from services.engine.scoring import top_by_text
from services.engine.structured import apply_grammar_masks
from services.family.compat import cache_argument_name


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
    num_layers: int | None = None  # the size asked for (needed where a batch mixes sizes)
    matcher: object | None = None  # the grammar an answer must follow (structured output), if any

    @property
    def done(self) -> bool:
        return self.finished or self.cancelled.is_set()


def _top_logprobs(logprobs: torch.Tensor, k: int, tokenizer) -> dict[str, float]:
    """The k likeliest tokens of one row of log-probs [vocab] as {text: logprob} (already normalised)."""
    return top_by_text(logprobs[None], logprobs.new_zeros(1), k, tokenizer.decode)[0]


class DecodeBatch:
    """Sequences that share a variant and advance together; finished rows idle until the batch ends."""

    joinable = False  # whether new sequences may join between steps (`join`)

    def __init__(self, model, sequences: list[Sequence], tokenizer, eos_ids: set[int], pad_id: int,
                 greedy_steps: int = GREEDY_STEPS):
        self.model, self.sequences, self.tokenizer = model, sequences, tokenizer
        self.greedy_steps = greedy_steps
        self.eos_ids, self.pad_id = eos_ids, pad_id
        self.device = next(model.parameters()).device
        self.cache = model.new_cache()
        self.cache_arg = cache_argument_name(type(model))
        self.attention_mask: torch.Tensor | None = None  # [batch, seen]
        self.positions: torch.Tensor | None = None  # [batch, 1]
        self.decoder_step = decoder_step(model)  # native per-layer decode steps, or None (transformers forward)
        for seq in sequences:
            seq.tracker = TextTracker(tokenizer, seq.params.stop)
            seq.generator = make_generator(seq.params.seed, self.device)

    @property
    def done(self) -> bool:
        return all(seq.done for seq in self.sequences)

    def release(self) -> None:
        """Called once the batch has left the scheduler; buffers from a pool go back to it (none here)."""

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=self.attention_mask, position_ids=position_ids,
                         use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache})
        return out.logits[:, -1].float()  # [batch, vocab]

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

    @torch.inference_mode()
    def prefill(self) -> None:
        self._advance(self._forward(*self._left_padded_prompts()))

    def _next_input(self) -> torch.Tensor:
        """The tokens chosen last step, [batch, 1]; extends the attention mask and advances the positions."""
        input_ids = self.next_tokens[:, None]  # [batch, 1]
        self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(input_ids)], dim=1)
        self.positions = self.positions + 1  # [batch, 1]
        return input_ids

    @torch.inference_mode()
    def step(self) -> int:
        """Advance every row: one token, or up to `greedy_steps` where all rows are greedy and the native
        decoder can run several steps in one call. Returns the number of tokens each row advanced."""
        native = self.decoder_step is not None and self.decoder_step.accepts(len(self.sequences), self.cache)
        steps = self._greedy_steps() if native else 1
        input_ids = self._next_input()  # [batch, 1]
        if steps > 1:
            return self._advance_greedy(input_ids, steps)
        if native:
            logits = self.decoder_step.step(input_ids, self.positions, self.attention_mask,
                                            self.cache)  # [batch, vocab]
        else:
            logits = self._forward(input_ids, self.positions)
        self._advance(logits)
        return 1

    def _greedy_steps(self) -> int:
        """How many steps one native call may take: 1 unless every live row is plain greedy (no logprobs, no
        logit adjustments); never more than the most tokens a live row may still produce."""
        live = [seq for seq in self.sequences if not seq.done]
        if not live or not self.decoder_step.takes_steps_ahead or any(
                not is_greedy(seq.params) or seq.params.logprobs is not None or adjusts_logits(seq.params)
                or seq.matcher is not None for seq in live):
            return 1
        return max(1, min(self.greedy_steps, max(seq.params.max_tokens - len(seq.tracker.token_ids) for seq in live)))

    def _advance_greedy(self, input_ids: torch.Tensor, steps: int) -> int:
        """Several greedy steps natively, then each row takes its tokens in order (a finished row ignores the
        rest: the chosen tokens are exactly those of single steps)."""
        alive = [not seq.done for seq in self.sequences]
        stop_ids = [] if any(seq.params.ignore_eos for seq in self.sequences) else sorted(self.eos_ids)
        chosen = self.decoder_step.greedy_steps(input_ids[:, 0], self.positions, self.attention_mask, self.cache, steps,
                                         stop_ids, alive)  # [n, batch]
        taken = len(chosen)
        ones = torch.ones(len(self.sequences), taken - 1, dtype=self.attention_mask.dtype)  # [batch, n-1]
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)  # the last token is fed next step
        self.positions = self.positions + (taken - 1)  # [batch, 1]
        for tokens in chosen.tolist():
            self._accept_rows(tokens)
        self.next_tokens = chosen[-1]  # [batch]
        return taken

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
