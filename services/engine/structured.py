"""Structured output: a grammar per sequence (a JSON schema, any JSON object, a regex, or a Lark grammar: forced
tool calls) masks the logits so the answer parses, at every size. llguidance compiles the grammar and computes
each step's allowed tokens (a bitmask over the vocabulary, in well under a decode step); a row that asks for none
is left alone."""

from __future__ import annotations

import json
import threading

import torch

from services.engine.compact_json import COMPACT_JSON
from services.engine.interface import StructuredOutput
from services.errors import InvalidRequestError

ANY_JSON_OBJECT = {"type": "object"}
KINDS = ("json_schema", "json_object", "regex", "lark")


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch
    except ImportError as error:  # pragma: no cover - a dependency of the project
        raise InvalidRequestError("structured output needs the package llguidance, which is not installed",
                                  param="response_format") from error
    return llguidance


class GrammarCompiler:
    """One per engine: the tokenizer's llguidance view (built on first use) and grammars checked against it."""

    def __init__(self, tokenizer, vocab_size: int):
        self.hf_tokenizer, self.vocab_size = tokenizer, vocab_size
        self._tokenizer = None
        self._lock = threading.Lock()

    def _llg_tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _llguidance().hf.from_tokenizer(self.hf_tokenizer, n_vocab=self.vocab_size)
            return self._tokenizer

    def matcher(self, structured: StructuredOutput):
        """A fresh matcher for one sequence; an invalid schema or regex is the client's error (400)."""
        llguidance = _llguidance()
        tokenizer = self._llg_tokenizer()
        try:
            if structured.kind == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(structured.text)
            elif structured.kind == "lark":
                grammar = llguidance.LLMatcher.grammar_from_lark(structured.text)
            else:
                schema = ANY_JSON_OBJECT if structured.kind == "json_object" else json.loads(structured.text)
                grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=COMPACT_JSON)
            problem = llguidance.LLMatcher.validate_grammar(grammar, tokenizer)
        except (ValueError, TypeError, RuntimeError) as error:
            problem = str(error)
        if problem:
            raise InvalidRequestError(f"{structured.field} cannot be used: {problem}", param=structured.field)
        return llguidance.LLMatcher(tokenizer, grammar)


def apply_grammar_masks(logits: torch.Tensor, matchers: list) -> torch.Tensor:
    """Logits [batch, vocab] with every token a row's grammar forbids at -inf (once the answer is complete, all
    but the end of sequence); rows with no matcher (None) are left as they are, and the input is returned where
    no row has a grammar."""
    rows = [row for row, matcher in enumerate(matchers) if matcher is not None]
    if not rows:
        return logits
    llg_torch = _llguidance().torch
    vocab = logits.shape[-1]
    bitmask = llg_torch.allocate_token_bitmask(len(rows), vocab)  # [rows, words], 32 tokens per word
    for index, row in enumerate(rows):
        llg_torch.fill_next_token_bitmask(matchers[row], bitmask, index)
    out = logits.clone()
    out[rows] = logits[rows].masked_fill(~allowed_tokens(bitmask.to(logits.device), vocab), float("-inf"))
    return out


def allowed_tokens(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """Bool [rows, vocab] from llguidance's bitmask [rows, words] (bit j of word i: token 32 i + j), in plain
    eager torch on the logits' device (llguidance's own kernel compiles on first use and stays on the CPU)."""
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)  # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab].bool()  # [rows, vocab]
