"""Server configuration: `BOOMERANG_*` environment variables, overridden by `boomerang serve` flags."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.engine.interface import DEFAULT_WEIGHTS, WEIGHT_FORMS, EngineLimits

_LIMITS = EngineLimits()  # each default written once: there


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BOOMERANG_", extra="ignore")

    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="least severe level logged")
    log_format: Literal["text", "json"] = Field(
        "text", description="text lines with timestamps, or one JSON object per line"
    )
    allowed_origins: list[str] = Field(
        default_factory=list, description="browser origins allowed to call the API (CORS); empty: none"
    )
    host: str = Field("127.0.0.1", description="address to listen on (0.0.0.0: every interface)")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    pair: str | None = Field(None, description="models_store pair folder (default: the default pair)")
    teacher: str | None = Field(None, description="teacher folder (paper layout; with --student)")
    student: str | None = Field(None, description="student folder holding student_config.json")
    order: str | None = Field(None, description="patch order: last, first or blocks 2,5,3,... (default: the pair's)")
    device: str | None = Field(None, description="cpu, cuda, cuda:1 … (default: cuda if present)")
    dtype: str | None = Field(None, description="float32, bfloat16 … (default: bf16 on GPU, fp32 on CPU)")
    weights: Literal[WEIGHT_FORMS] = Field(
        DEFAULT_WEIGHTS,
        description="float: as loaded, in the pair's dtype; "
        "int8: every matrix and embedding as int8 with per-row scales "
        "(a quarter of fp32's bytes, faster decode on CPU); q4: matrices in "
        "4-bit blocks of 32 (llama.cpp's Q4_1), embeddings int8",
    )
    name: str | None = Field(None, description="family id served (default: the pair's name)")
    threads: int | None = Field(
        None,
        ge=1,
        description="torch's compute threads (default: OMP_NUM_THREADS if "
        "set, else the container's CPU quota, else the CPUs this process may use)",
    )
    native_kernels: bool = Field(
        True,
        description="fp32 CPU decode through the native kernels: the AVX2 GEMV, "
        "and the fused decoder step for Llama/Qwen layers (false: torch's matmul and "
        "the layers' own forward)",
    )
    api_keys: list[str] = Field(default_factory=list, description="accepted bearer keys; empty = no auth")
    max_prompt_tokens: int = Field(4096, ge=1, description="longest prompt accepted, in tokens")
    max_total_tokens: int = Field(8192, ge=1, description="prompt + completion")
    max_tokens_default: int = Field(
        16,
        ge=0,
        description="completions' max_tokens when a request gives none "
        "(OpenAI's default); a chat with none answers until its turn ends",
    )
    max_n: int = Field(8, ge=1, description="most choices (n) per request")
    max_stop_strings: int = Field(16, ge=0, description="most stop strings per request")
    max_concurrent: int = Field(_LIMITS.max_concurrent, ge=1, description="sequences decoding at once")
    max_queue: int = Field(_LIMITS.max_queue, ge=0, description="requests waiting beyond max_concurrent; more get 429")
    max_batch_size: int = Field(_LIMITS.max_batch_size, ge=1, description="rows a batch starts with")
    mix_sizes: bool = Field(
        _LIMITS.mix_sizes,
        description="requests of different sizes share decode batches "
        "(each weight read once per step for all of them); false: one batch per size",
    )
    join_batches: bool = Field(
        _LIMITS.join_batches,
        description="new requests join a running batch between two steps; false: they wait for it to end",
    )
    prefill_chunk: int = Field(
        _LIMITS.prefill_chunk,
        ge=0,
        description="while requests decode, the prompts prefilled between two of their steps take at most this "
        "many tokens (a longer one in chunks), so a long prompt delays them by one chunk; 0: each prompt's whole "
        "prefill at once",
    )
    batch_wait_ms: float = Field(
        _LIMITS.batch_wait_ms, ge=0, description="a batch forms once no request arrived for this long (cap: 8x)"
    )
    latency_target_ms: float | None = Field(
        None,
        gt=0,
        description="`auto` requests without a budget get the "
        "largest size predicted to answer within this; none: the largest",
    )
    overload_policy: Literal["reject", "degrade"] = Field(
        "reject",
        description="degrade: a request with allow_smaller is served smaller when its size would miss "
        "its budget or the latency target; reject: explicit sizes are never changed",
    )
    variant_cache_size: int = Field(32, ge=1, description="assembled sizes kept")
    request_timeout_s: float = Field(300.0, gt=0, description="a request still running after this gets 504")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="larger request bodies get 413")
    graceful_timeout_s: float = Field(30.0, ge=0, description="on SIGTERM, in-flight requests get this long")
    playground: bool = Field(True, description="serve the playground page at / (--no-playground: off)")

    def engine_limits(self) -> EngineLimits:
        """The one place server settings become engine limits."""
        return EngineLimits(
            max_concurrent=self.max_concurrent,
            max_queue=self.max_queue,
            max_batch_size=self.max_batch_size,
            batch_wait_ms=self.batch_wait_ms,
            max_model_len=self.max_total_tokens,
            mix_sizes=self.mix_sizes,
            join_batches=self.join_batches,
            prefill_chunk=self.prefill_chunk,
        )
