"""The inference engine over one family: admission control, async streaming, scoring, model listing."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict

import torch
from jinja2 import TemplateError

from services.cpu.heap import trim_heap
from services.engine.backends import steps_for
from services.engine.batch import Sequence
from services.engine.family_batch import FamilyBatch
from services.engine.interface import EngineLimits, ModelCard, SamplingParams, ScoreResult, StreamDelta
from services.engine.kv_pool import KVPool
from services.engine.memory import available_bytes, check_fits, memory_bound
from services.engine.scheduler import BatchKey, Housekeeping, Scheduler
from services.engine.scoring import packs_prompts, score_prompts
from services.engine.step_times import PrefillRate, StepTimes
from services.engine.structured import GrammarCompiler
from services.engine.tool_calls import ToolCallFormat, template_tool_format
from services.errors import ContextLengthError, InvalidRequestError, OverloadedError, UnknownSizeError
from services.family import Family
from services.family.architectures import get_path
from services.family.plan import block_choices

MIXED = "mixed"  # the scheduler key of batches that mix sizes


class InferenceEngine:
    """Implements `services.engine.interface.Engine` for a loaded `Family`."""

    def __init__(self, family: Family, limits: EngineLimits = EngineLimits(),
                 on_batch: Callable[[BatchKey, int], None] | None = None):
        self.family, self.limits = family, limits
        self.tokenizer = family.tokenizer
        self.family_name = family.name
        config_len = getattr(family.teacher.config, "max_position_embeddings", None) or 2048
        self.max_model_len = min(limits.max_model_len or config_len, config_len)
        eos = family.teacher.generation_config.eos_token_id or self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.grammars = GrammarCompiler(self.tokenizer, family.teacher.config.vocab_size)
        self._tool_format: ToolCallFormat | str | None = None  # the format, or why there is none; found on first use
        self.mix_sizes = limits.mix_sizes
        spec = family.spec
        layers = [*get_path(family.teacher, spec.layers), *get_path(family.student, spec.layers)]
        self.packs_prompts = packs_prompts(layers, spec.attention, family.teacher.config)
        self.memory_bound = self._memory_bound()
        check_fits(self.memory_bound, available_bytes())
        self.kv_pool = KVPool(family.dtype, self.memory_bound.kv_bytes, family.device)
        self._warm_up()
        self._in_flight = 0
        self._lock = threading.Lock()
        on_cpu = family.device.type == "cpu"  # the heap that holds the tensors is the C library's
        self.step_times, self.prefill_rate = StepTimes(), PrefillRate()
        self.scheduler = Scheduler(self._make_batch, limits, on_batch,
                                   Housekeeping(self._return_memory) if on_cpu else None, self.step_times.observe,
                                   self.prefill_rate.observe)
        self.scheduler.start()

    def _return_memory(self) -> None:
        """KV blocks idle for a while, then the heap's free pages, back to the system."""
        self.kv_pool.release_idle()
        trim_heap()

    def _warm_up(self) -> None:
        """Assembles the sizes the variant cache holds and every group's step backends (the kernel's layer
        stacks) before the first request: what they allocate is there at start, not a minute into traffic,
        and a model the backends cannot serve is refused here, not at its first request."""
        family = self.family
        for n in family.sizes[-family.cache_size:]:
            family.variant(n)
        teacher_layers = get_path(family.teacher, family.spec.layers)
        student_layers = get_path(family.student, family.spec.layers)
        branch_layers = [([student_layers[block]], [teacher_layers[t] for t in teacher_block])
                         for block, teacher_block in enumerate(family.layout.blocks)]
        for student_branch, teacher_branch in branch_layers:
            steps_for(family, student_branch)
            steps_for(family, teacher_branch)
        for n in family.sizes:  # the run of a batch of one size: all its layers
            choices = block_choices(family.layout, family.plan(n))
            steps_for(family, [layer for branches, patched in zip(branch_layers, choices)
                               for layer in branches[patched]])

    def _memory_bound(self):
        config, family = self.family.teacher.config, self.family
        item_bytes = torch.empty((), dtype=family.dtype).element_size()
        return memory_bound(config, item_bytes, family.weights_bytes(), self.max_model_len,
                            self.limits.max_batch_size, self.limits.max_concurrent, self.mix_sizes)

    # -- sizes -------------------------------------------------------------------------------------------
    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.family.model_id(n), **asdict(self.family.size_info(n)),
                          quality=self.family.quality.get(str(n), {})) for n in self.family.sizes]

    def model_id(self, num_layers: int) -> str:
        return self.family.model_id(num_layers)

    def resolve_size(self, model: str | None, num_layers: int | None) -> int:
        """`model` may be the family id (the teacher), a size id (`<family>-22L`); `num_layers` must agree."""
        from_model = None
        if model is not None and model != self.family_name:
            match = re.fullmatch(re.escape(self.family_name) + r"-(\d+)L", model)
            if match is None:
                raise UnknownSizeError(f"model {model!r} does not exist; GET /v1/models lists them", param="model")
            from_model = int(match.group(1))
        if from_model is not None and num_layers is not None and from_model != num_layers:
            raise InvalidRequestError(f"model {model!r} has {from_model} layers but num_layers={num_layers}",
                                      param="num_layers")
        size = from_model if from_model is not None else num_layers
        if size is None:
            return max(self.family.sizes)
        if size not in self.family.sizes:
            param = "model" if from_model is not None else "num_layers"
            raise UnknownSizeError(f"no {size}-layer model in {self.family_name}; sizes are {self.family.sizes}",
                                   param=param)
        return size

    # -- text ----------------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def detokenize(self, token_ids: list[int]) -> str:
        vocab = len(self.tokenizer)
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}", param="tokens")
        return self.tokenizer.decode(token_ids)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        self.detokenize(token_ids)  # raises on ids outside the vocabulary
        return self.tokenizer.convert_ids_to_tokens(token_ids)

    def tokenizer_info(self) -> dict:
        """What a remote client needs to tokenize as we do (lm-eval reads the special tokens and template)."""
        tokenizer = self.tokenizer
        return {"tokenizer_class": type(tokenizer).__name__, "eos_token": tokenizer.eos_token,
                "bos_token": tokenizer.bos_token, "pad_token": tokenizer.pad_token, "unk_token": tokenizer.unk_token,
                "chat_template": tokenizer.chat_template, "vocab_size": len(tokenizer),
                "model_max_length": self.max_model_len}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        if not self.tokenizer.chat_template:
            raise InvalidRequestError("this model has no chat template; use /v1/completions", param="messages")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, tools=tools or None,
                                                      add_generation_prompt=add_generation_prompt)
        except TemplateError as error:  # the template's own checks (raise_exception) speak to the client
            raise InvalidRequestError(f"the chat template refused these messages: {error}", param="messages") from None

    def tool_call_format(self, param: str) -> ToolCallFormat:
        """The format the pair's chat template writes tool calls in; a request needing one where the template has
        none is refused, naming `param`."""
        if self._tool_format is None:
            self._tool_format = template_tool_format(self.tokenizer)
        if isinstance(self._tool_format, str):
            raise InvalidRequestError(self._tool_format, param=param)
        return self._tool_format

    # -- admission -------------------------------------------------------------------------------------------
    def _admit(self) -> None:
        with self._lock:
            if self._in_flight >= self.limits.max_concurrent + self.limits.max_queue:
                raise OverloadedError(
                    f"server is at capacity ({self._in_flight} requests in flight); retry shortly", retry_after_s=1)
            self._in_flight += 1

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _check_length(self, prompt_ids: list[int], max_tokens: int) -> None:
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if len(prompt_ids) + max_tokens > self.max_model_len:
            raise ContextLengthError(
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens}) exceeds the context length "
                f"of {self.max_model_len} tokens", param="max_tokens")

    # -- generation -------------------------------------------------------------------------------------------
    def _make_batch(self, key: BatchKey, sequences: list[Sequence]) -> FamilyBatch:
        """Both keys (`mixed`, or one size with --mix-sizes false) build the same batch."""
        return FamilyBatch(self.family, sequences, self.tokenizer, self.eos_ids, self.pad_id,
                           joinable=self.limits.join_batches, pool=self.kv_pool)

    async def generate(self, num_layers: int, prompt_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[StreamDelta]:
        """Stream deltas as tokens are made; closing the iterator (client gone) cancels the sequence."""
        self.family.plan(num_layers)
        self._check_length(prompt_ids, params.max_tokens)
        if params.max_tokens == 0:
            yield StreamDelta("", (), (), "length", len(prompt_ids), 0)
            return
        self._admit()
        seq = None
        try:
            # compiling a grammar (and, the first time, the tokenizer's view) is too slow for the event loop
            matcher = await asyncio.to_thread(self.grammars.matcher, params.structured) if params.structured else None
            loop, queue = asyncio.get_running_loop(), asyncio.Queue()
            seq = Sequence(list(prompt_ids), params, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
                           num_layers=num_layers, matcher=matcher)
            self.scheduler.submit(MIXED if self.mix_sizes else num_layers, seq)
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            if seq is not None:
                seq.cancelled.set()
            self._release()

    async def score(self, num_layers: int, prompt_ids: list[int], top_logprobs: int = 0) -> ScoreResult:
        """Log-probability of each prompt token given the ones before it (the first has none)."""
        return (await self.score_batch(num_layers, [prompt_ids], top_logprobs))[0]

    async def score_batch(self, num_layers: int, prompts: list[list[int]], top_logprobs: int = 0) -> list[ScoreResult]:
        """Several prompts scored as one piece of work, up to `max_batch_size` prompts per forward."""
        self.family.plan(num_layers)
        for prompt_ids in prompts:
            self._check_length(prompt_ids, 0)
        self._admit()
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()

        def run() -> None:
            try:
                result = self._score_now(num_layers, prompts, top_logprobs)
                loop.call_soon_threadsafe(_resolve, future, result)
            except Exception as error:  # noqa: BLE001 - handed to the awaiting caller
                loop.call_soon_threadsafe(_resolve, future, error)

        try:
            self.scheduler.submit_job(run)
            return await future
        finally:
            self._release()

    def _score_now(self, num_layers: int, prompts: list[list[int]], top_logprobs: int) -> list[ScoreResult]:
        """Up to `max_batch_size` rows per forward: prompts, or, where they share a prefix, packed groups."""
        return score_prompts(self.family.variant(num_layers), prompts, top_logprobs, self.tokenizer, self.eos_ids,
                             self.pad_id, self.max_model_len if self.packs_prompts else None,
                             self.limits.max_batch_size)

    def sampling_defaults(self) -> dict:
        return dict(self.family.sampling_defaults)

    def stats(self) -> dict:
        return {"in_flight": self._in_flight, "waiting": self.scheduler.num_waiting,
                "running": self.scheduler.num_running, "cached_sizes": self.family.cached_sizes(),
                "kv_reserved_bytes": self.kv_pool.reserved_bytes, "kv_in_use_bytes": self.kv_pool.in_use_bytes,
                "memory_bound_bytes": self.memory_bound.total_bytes, "weights_bytes": self.memory_bound.weights_bytes,
                "running_layers": self.scheduler.running_layers(), "step_model": self.step_times.model(),
                "prefill_s_per_layer_token": self.prefill_rate.seconds_per_layer_token()}

    def close(self) -> None:
        self.scheduler.stop()


def _resolve(future: asyncio.Future, value) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)
