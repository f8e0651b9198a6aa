"""The engine interface the HTTP layer talks to: plain data and a Protocol, no torch."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol

from services.engine.tool_calls import ToolCallFormat

MIN_TEMPERATURE = 1e-4  # below this, dividing the logits overflows: sampling is treated as greedy


# how the pair's weights are held: as loaded, in the pair's float dtype; every matrix and embedding as int8 with
# one scale per row (a quarter of fp32's bytes, read on every token); or every matrix in 4-bit blocks of 32 with
# a scale and a minimum each (llama.cpp's Q4_1) and embeddings in int8
WEIGHT_FORMS = ("float", "int8", "q4")
DEFAULT_WEIGHTS = "float"


@dataclass(frozen=True)
class EngineLimits:
    """What the engine may hold and how it batches; the server's settings take their defaults from here."""

    max_concurrent: int = 16  # sequences decoding at once
    max_queue: int = 64  # requests waiting beyond max_concurrent; more are refused
    max_batch_size: int = 8  # rows a batch starts with
    batch_wait_ms: float = 5.0  # a batch forms once no request arrived for this long (capped)
    max_model_len: int | None = None  # prompt + completion; None: the model's own limit
    mix_sizes: bool = True  # requests of different sizes share decode batches; false: one batch per size
    join_batches: bool = True  # new requests join a running batch between steps
    # prompt tokens (rows x positions) prefilled between two steps while rows decode, a longer prompt in chunks
    # (0: in one pass): enough for GEMM to run at speed, few enough that a stream waits a fraction of a second
    prefill_chunk: int = 256


@dataclass(frozen=True)
class StructuredOutput:
    kind: str  # "json_schema" (text: the schema as JSON), "json_object" (text unused), "regex" or "lark"
    text: str
    field: str  # the request field that asked for it, named in errors


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: int | None = None  # number of top alternatives per token; None = no log-probs
    ignore_eos: bool = False
    presence_penalty: float = 0.0  # subtracted once from every token already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in what was generated
    repetition_penalty: float = 1.0  # divides (or multiplies, if negative) logits of prompt and generated tokens
    min_p: float = 0.0  # drops tokens less likely than min_p x the most likely one (sampling only)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    stop_token_ids: tuple[int, ...] = ()  # finish when one is generated (not in the text)
    min_tokens: int = 0  # end-of-sequence and stop tokens are barred until this many are generated
    structured: StructuredOutput | None = None  # a grammar every answer follows


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamDelta:
    """New text of one generated sequence; `finish_reason` is set on the last delta."""

    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class NextToken:
    """The greedy token after a scored prompt, as generation would have produced it."""

    token_id: int
    text: str  # as it would stream: special tokens dropped
    logprob: TokenLogprob
    is_eos: bool


@dataclass(frozen=True)
class ScoreResult:
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    logprobs: tuple[float | None, ...]  # first token has none
    top_logprobs: tuple[dict[str, float] | None, ...] = ()
    next_token: NextToken | None = None

    @property
    def total(self) -> float:
        return sum(lp for lp in self.logprobs if lp is not None)


@dataclass(frozen=True)
class ModelCard:
    """One size of the family as `/v1/models` lists it: the family's `SizeInfo` (which app/ cannot import:
    torch) with its id and quality; the HTTP schema `ModelEntry` is built from it field for field."""

    id: str
    num_layers: int
    patched_blocks: int
    parameters: int
    bytes: int
    quality: dict = field(default_factory=dict)


class Engine(Protocol):
    """What `app/` needs from the inference engine."""

    family_name: str
    max_model_len: int

    def models(self) -> list[ModelCard]: ...

    def resolve_size(self, model: str | None, num_layers: int | None) -> int: ...

    def model_id(self, num_layers: int) -> str: ...

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def detokenize(self, token_ids: list[int]) -> str: ...

    def token_strings(self, token_ids: list[int]) -> list[str]: ...

    def tokenizer_info(self) -> dict: ...

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str: ...

    def tool_call_format(self, param: str) -> ToolCallFormat: ...

    def generate(
        self, num_layers: int, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[StreamDelta]: ...

    async def score(self, num_layers: int, prompt_ids: list[int], top_logprobs: int = 0) -> ScoreResult: ...

    async def score_batch(
        self, num_layers: int, prompts: list[list[int]], top_logprobs: int = 0
    ) -> list[ScoreResult]: ...

    def sampling_defaults(self) -> dict:
        """Sampling fields the pair sets for requests that set none of them (e.g. `repetition_penalty`)."""
        ...

    def stats(self) -> dict: ...

    def close(self) -> None: ...
