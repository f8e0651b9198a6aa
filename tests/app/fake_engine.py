"""A torch-free engine for route tests: deterministic text, controllable delays and failures."""

from __future__ import annotations

import asyncio
import threading

from services.engine.interface import ModelCard, NextToken, SamplingParams, ScoreResult, StreamDelta, TokenLogprob
from services.errors import InvalidRequestError, OverloadedError, UnknownSizeError

WORDS = ["alpha ", "beta ", "gamma ", "delta "]
VOCAB_SIZE = 50_000


class FakeEngine:
    family_name = "fake"
    max_model_len = 64

    def __init__(self, token_delay_s: float = 0.0, capacity: int = 1000):
        self.token_delay_s, self.capacity = token_delay_s, capacity
        self.in_flight = 0
        self.closed = False
        self.defaults: dict = {}
        self.params_seen: list[SamplingParams] = []

    def models(self) -> list[ModelCard]:
        return [ModelCard(f"fake-{n}L", n, n - 2, 1000 * n, 4000 * n) for n in (2, 3, 4)]

    def resolve_size(self, model, num_layers):
        if model not in (None, "fake", "fake-2L", "fake-3L", "fake-4L"):
            raise UnknownSizeError(f"model {model!r} does not exist", param="model")
        return num_layers or (int(model[5]) if model and model != "fake" else 4)

    def model_id(self, num_layers: int) -> str:
        return f"fake-{num_layers}L"

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) % 97 for c in text]

    def detokenize(self, token_ids) -> str:
        if any(not 0 <= t < VOCAB_SIZE for t in token_ids):
            raise InvalidRequestError("token ids outside the vocabulary", param="tokens")
        return "".join(chr(97 + t % 26) for t in token_ids)

    def token_strings(self, token_ids) -> list[str]:
        return list(self.detokenize(token_ids))

    def tokenizer_info(self) -> dict:
        return {"tokenizer_class": "FakeTokenizer", "eos_token": "</s>", "bos_token": None, "pad_token": None,
                "chat_template": "{{ messages }}", "vocab_size": VOCAB_SIZE, "model_max_length": self.max_model_len}

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tools=None) -> str:
        return "".join(m["content"] for m in messages)

    def tool_call_format(self, param: str):
        raise InvalidRequestError("the fake engine's template has no tools", param=param)

    async def generate(self, num_layers: int, prompt_ids, params: SamplingParams):
        if self.in_flight >= self.capacity:
            raise OverloadedError("busy", retry_after_s=2)
        self.in_flight += 1
        self.params_seen.append(params)
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(self.token_delay_s)
                last = i == params.max_tokens - 1
                yield StreamDelta(WORDS[i % 4], (i,), (), "length" if last else None, len(prompt_ids), i + 1)
        finally:
            self.in_flight -= 1

    async def score(self, num_layers, prompt_ids, top_logprobs=0) -> ScoreResult:
        next_token = NextToken(0, WORDS[0], TokenLogprob(WORDS[0], -0.5), False)
        return ScoreResult(tuple(prompt_ids), tuple("x" for _ in prompt_ids),
                           (None, *[-1.0] * (len(prompt_ids) - 1)), next_token=next_token)

    async def score_batch(self, num_layers, prompts, top_logprobs=0) -> list[ScoreResult]:
        return [await self.score(num_layers, ids, top_logprobs) for ids in prompts]

    def sampling_defaults(self) -> dict:
        return dict(self.defaults)

    def stats(self) -> dict:
        return {"in_flight": self.in_flight, "waiting": 0, "running": self.in_flight, "kv_reserved_bytes": 4096,
                "kv_in_use_bytes": 1024, "memory_bound_bytes": 10 ** 9, "weights_bytes": 10 ** 8}

    def close(self) -> None:
        self.closed = True


class GatedFactory:
    """An engine factory that blocks until `release()` — to observe the server while it loads."""

    def __init__(self, engine: FakeEngine | None = None, error: Exception | None = None):
        self.engine, self.error = engine or FakeEngine(), error
        self.gate = threading.Event()

    def release(self) -> None:
        self.gate.set()

    def __call__(self, settings, metrics):
        self.gate.wait(30)
        if self.error:
            raise self.error
        return self.engine
