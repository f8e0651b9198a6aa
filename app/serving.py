"""Serving logic for the OpenAI and native endpoints: requests in, engine calls, response bodies out.

No routing here and no FastAPI: routes call these methods and wrap what they return.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from app.metrics import Metrics
from app.schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerateRequest,
    SamplingFields,
    ScoreRequest,
    TokenizeRequest,
    template_messages,
)
from app.settings import Settings
from app.sizes import Requested, choose, observed, requested_size
from app.streams import SSE_DONE, merge, sse, with_deadline
from app.tool_choice import ChatToolCalls, check_history
from services.engine.interface import (
    MIN_TEMPERATURE,
    Engine,
    SamplingParams,
    ScoreResult,
    StreamDelta,
    StructuredOutput,
)
from services.engine.latency import LatencyModel
from services.errors import BoomerangError, ContextLengthError, InvalidRequestError


@dataclass
class Choice:
    """One sequence to generate: which prompt, with which parameters."""

    index: int
    prompt_ids: list[int]
    params: SamplingParams


@dataclass
class Collected:
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    logprobs: list = field(default_factory=list)


def _score_as_legacy_logprobs(score: ScoreResult) -> dict:
    offsets, position = [], 0
    for token in score.tokens:
        offsets.append(position)
        position += len(token)
    tops = list(score.top_logprobs) if score.top_logprobs else [None] * len(score.tokens)
    return {"tokens": list(score.tokens), "token_logprobs": list(score.logprobs), "top_logprobs": tops,
            "text_offset": offsets}


PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")  # the pair may set defaults


def _next_token_is_in_the_score(req: CompletionRequest, max_tokens: int, repetition_penalty: float) -> bool:
    """A log-likelihood request (echo, logprobs, one greedy token, nothing that shapes the choice) gets its token
    from the scoring forward: one pass instead of a scoring and a generation."""
    plain = SamplingParams()
    return (max_tokens == 1 and req.n == 1 and req.temperature < MIN_TEMPERATURE and not req.stop_list()
            and req.structured() is None
            and not req.ignore_eos and not req.logit_bias and not req.stop_token_ids and req.min_tokens == 0
            # presence and frequency penalties count the answer's tokens, and the first token has none before it
            and repetition_penalty == plain.repetition_penalty)


def _collected_from_score(score: ScoreResult) -> Collected:
    token = score.next_token
    return Collected(text="" if token.is_eos else token.text, finish_reason="stop" if token.is_eos else "length",
                     completion_tokens=1, prompt_tokens=len(score.token_ids), logprobs=[token.logprob])


class Serving:
    def __init__(self, engine: Engine, settings: Settings, metrics: Metrics, latency: LatencyModel):
        self.engine, self.settings, self.metrics, self.latency = engine, settings, metrics, latency
        self.served_size: int | None = None  # the size chosen for this request (the response names it)

    # -- validation ---------------------------------------------------------------------------------------
    def _tokenized(self, prompt) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [self.engine.tokenize(prompt)]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.engine.tokenize(p) for p in prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [list(prompt)]
        else:
            prompts = [list(p) for p in prompt]
        for ids in prompts:
            if not ids:
                raise InvalidRequestError("the prompt is empty", param="prompt")
            if not isinstance(prompt, str) and not isinstance(prompt[0], str):
                self.engine.detokenize(ids)  # raises on ids outside the vocabulary
        return prompts

    def _check(self, prompts: list[list[int]], max_tokens: int, req: SamplingFields) -> None:
        if req.n > self.settings.max_n:
            raise InvalidRequestError(f"n={req.n} exceeds the limit of {self.settings.max_n}", param="n")
        if len(req.stop_list()) > self.settings.max_stop_strings:
            raise InvalidRequestError(f"at most {self.settings.max_stop_strings} stop strings", param="stop")
        if req.min_tokens > max_tokens:
            raise InvalidRequestError(f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})",
                                      param="min_tokens")
        self._check_token_ids(list(req.logit_bias or {}), "logit_bias")
        self._check_token_ids(list(req.stop_token_ids or ()), "stop_token_ids")
        limit = self.context_limit()
        for ids in prompts:
            if len(ids) > self.settings.max_prompt_tokens:
                raise ContextLengthError(f"prompt has {len(ids)} tokens; the limit is "
                                         f"{self.settings.max_prompt_tokens}", param="prompt")
            if len(ids) + max_tokens > limit:
                raise ContextLengthError(f"prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the "
                                         f"context length of {limit} tokens", param="max_tokens")

    def _check_token_ids(self, token_ids: list[int], param: str) -> None:
        try:
            self.engine.detokenize(token_ids)  # raises on ids outside the vocabulary
        except InvalidRequestError as error:
            raise InvalidRequestError(str(error), param=param) from None

    def context_limit(self) -> int:
        """Prompt plus completion, in tokens: the smaller of the server's limit and the model's."""
        return min(self.settings.max_total_tokens, self.engine.max_model_len)

    def _until_end_of_turn(self, prompts: list[list[int]]) -> int:
        """A chat with no `max_tokens` may answer until the end of its turn or the context limit, as OpenAI's."""
        limit, longest = self.context_limit(), max(len(ids) for ids in prompts)
        if longest >= limit:
            raise ContextLengthError(f"the conversation ({longest} tokens) leaves no room for an answer in the "
                                     f"context length of {limit} tokens", param="messages")
        return limit - longest

    def _choose(self, wanted: Requested, req: SamplingFields, prompts: list[list[int]],
                max_tokens: int | None) -> int:
        """The size that serves: the one asked for, or the largest that fits the budget (see app.sizes)."""
        sizes = sorted(self.latency.cards)
        self.latency.arrive()
        size = choose(wanted, req, self.settings, self.latency, sizes, self.engine.stats(),
                      max(len(ids) for ids in prompts), max_tokens)
        if wanted.may_shrink:
            self.metrics.size_choices.labels(str(wanted.largest), str(size)).inc()
        self.served_size = size
        return size

    def _penalties(self, req: SamplingFields) -> dict[str, float]:
        """Each penalty: the request's own, else the pair's default (as vLLM takes a model's generation config),
        else off."""
        defaults, plain = self.engine.sampling_defaults(), SamplingParams()
        return {name: value if (value := getattr(req, name)) is not None else defaults.get(name, getattr(plain, name))
                for name in PENALTIES}

    def _choices(self, prompts: list[list[int]], req: SamplingFields, max_tokens: int, logprobs: int | None,
                 structured: StructuredOutput | None = None) -> list[Choice]:
        choices, penalties = [], self._penalties(req)
        for p_index, ids in enumerate(prompts):
            for copy in range(req.n):
                index = p_index * req.n + copy
                seed = None if req.seed is None else req.seed + index
                params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                        top_k=max(0, req.top_k), stop=req.stop_list(), seed=seed,
                                        logprobs=logprobs, ignore_eos=req.ignore_eos,
                                        **penalties, min_p=req.min_p,
                                        logit_bias=tuple((req.logit_bias or {}).items()),
                                        stop_token_ids=tuple(req.stop_token_ids or ()), min_tokens=req.min_tokens,
                                        structured=structured or req.structured())
                choices.append(Choice(index, ids, params))
        return choices

    def _stream(self, size: int, choice: Choice, endpoint: str) -> AsyncIterator[StreamDelta]:
        stats = self.engine.stats()
        queued = stats.get("waiting", 0) > 0 or stats.get("running", 0) >= self.settings.max_concurrent
        stream = observed(self.engine.generate(size, choice.prompt_ids, choice.params), self.latency, size, queued)
        return with_deadline(self.metrics.observe_stream(stream, self.engine.model_id(size), endpoint),
                             self.settings.request_timeout_s)

    async def _collect(self, size: int, choices: list[Choice], endpoint: str) -> list[Collected]:
        results = [Collected(prompt_tokens=len(c.prompt_ids)) for c in choices]
        async for index, delta in merge([self._stream(size, c, endpoint) for c in choices]):
            result = results[index]
            result.text += delta.text
            result.logprobs += list(delta.logprobs)
            result.completion_tokens = delta.completion_tokens
            result.finish_reason = delta.finish_reason or result.finish_reason
        return results

    @staticmethod
    def _usage(prompts: list[list[int]], completion_tokens: int) -> dict:
        prompt_tokens = sum(len(p) for p in prompts)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    # -- completions ----------------------------------------------------------------------------------------
    async def completion(self, req: CompletionRequest) -> dict | AsyncIterator[str]:
        wanted = requested_size(self.engine, req, self.settings)
        prompts = self._tokenized(req.prompt)
        max_tokens = self.settings.max_tokens_default if req.max_tokens is None else req.max_tokens
        self._check(prompts, max_tokens, req)
        size = self._choose(wanted, req, prompts, max_tokens)
        choices = self._choices(prompts, req, max_tokens, req.logprobs)
        scores = await self._echo_scores(size, prompts, req) if req.echo else None
        if req.stream:
            return self._completion_stream(size, prompts, choices, req, scores)
        if scores and _next_token_is_in_the_score(req, max_tokens, self._penalties(req)["repetition_penalty"]):
            results = [_collected_from_score(score) for score in scores]
            for result in results:
                self.metrics.count("completions", self.engine.model_id(size), prompt_tokens=result.prompt_tokens,
                                   completion_tokens=result.completion_tokens)
        else:
            results = await self._collect(size, choices, "completions")
        body = [self._completion_choice(c, r, req, prompts, scores) for c, r in zip(choices, results)]
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.engine.model_id(size), "choices": body,
                "usage": self._usage(prompts, sum(r.completion_tokens for r in results))}

    async def _echo_scores(self, size: int, prompts: list[list[int]], req: CompletionRequest) -> list | None:
        if req.logprobs is None:
            return None
        return await self.engine.score_batch(size, prompts, req.logprobs)

    def _completion_choice(self, choice: Choice, result: Collected, req: CompletionRequest, prompts,
                           scores) -> dict:
        p_index = choice.index // req.n
        text = (self.engine.detokenize(prompts[p_index]) if req.echo else "") + result.text
        logprobs = None
        if req.logprobs is not None:
            logprobs = _score_as_legacy_logprobs(scores[p_index]) if scores else {
                "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            offset = len(text) - len(result.text)
            for item in result.logprobs:
                logprobs["tokens"].append(item.token)
                logprobs["token_logprobs"].append(item.logprob)
                logprobs["top_logprobs"].append(item.top or None)
                logprobs["text_offset"].append(offset)
                offset += len(item.token)
        return {"index": choice.index, "text": text, "logprobs": logprobs, "finish_reason": result.finish_reason}

    async def _started(self, size: int, choices: list[Choice], endpoint: str):
        """Merged choice streams with their first delta already produced, so admission errors keep their status."""
        merged = merge([self._stream(size, c, endpoint) for c in choices])
        first = await anext(merged)

        async def rest():
            try:
                yield first
                async for item in merged:
                    yield item
            finally:
                await merged.aclose()
        return rest()

    async def _sse(self, size: int, prompts, choices: list[Choice], endpoint: str, head: dict, prelude: list[dict],
                   render, include_usage: bool) -> AsyncIterator[str]:
        """The SSE event stream shared by completions and chat: prelude, one event per delta, usage, [DONE]."""
        completion_tokens = [0] * len(choices)
        deltas = await self._started(size, choices, endpoint)
        try:
            for choice_body in prelude:
                yield sse({**head, "choices": [choice_body]})
            async for index, delta in deltas:
                completion_tokens[index] = delta.completion_tokens
                yield sse({**head, "choices": [{"index": index, "finish_reason": delta.finish_reason,
                                                **render(index, delta)}]})
            if include_usage:
                yield sse({**head, "choices": [], "usage": self._usage(prompts, sum(completion_tokens))})
        except BoomerangError as error:
            yield sse(self._stream_error(error))
        finally:
            await deltas.aclose()
        yield SSE_DONE

    @staticmethod
    def _include_usage(req: SamplingFields) -> bool:
        return bool(req.stream_options and req.stream_options.include_usage)

    def _completion_stream(self, size, prompts, choices, req: CompletionRequest, scores) -> AsyncIterator[str]:
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.engine.model_id(size)}
        prelude = [{**self._completion_choice(c, Collected(), req, prompts, scores), "finish_reason": None}
                   for c in choices] if req.echo else []

        def render(index: int, delta: StreamDelta) -> dict:
            logprobs = None
            if req.logprobs is not None:
                logprobs = {"tokens": [i.token for i in delta.logprobs],
                            "token_logprobs": [i.logprob for i in delta.logprobs],
                            "top_logprobs": [i.top or None for i in delta.logprobs]}
            return {"text": delta.text, "logprobs": logprobs}

        return self._sse(size, prompts, choices, "completions", head, prelude, render, self._include_usage(req))

    @staticmethod
    def _stream_error(error: BoomerangError) -> dict:
        return {"error": {"message": error.message, "type": "server_error", "param": error.param,
                          "code": error.code}}

    # -- chat ---------------------------------------------------------------------------------------------
    async def chat(self, req: ChatRequest) -> dict | AsyncIterator[str]:
        wanted = requested_size(self.engine, req, self.settings)
        calls = ChatToolCalls.of(req, self.engine)
        messages = template_messages(req.messages)
        prompts = [self.engine.tokenize(self.engine.apply_chat_template(messages, tools=calls.rendered_tools()))]
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self._until_end_of_turn(prompts) if requested is None else requested
        self._check(prompts, max_tokens, req)
        size = self._choose(wanted, req, prompts, requested)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        choices = self._choices(prompts, req, max_tokens, logprobs, calls.grammar())
        if req.stream:
            return self._chat_stream(size, prompts, choices, req, calls)
        results = await self._collect(size, choices, "chat")
        body = [{"index": c.index, **calls.message(r.text, r.finish_reason),
                 "logprobs": self._chat_logprobs(r.logprobs) if req.logprobs else None}
                for c, r in zip(choices, results)]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.engine.model_id(size), "choices": body,
                "usage": self._usage(prompts, sum(r.completion_tokens for r in results))}

    @staticmethod
    def _chat_logprobs(items) -> dict:
        def entry(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
        return {"content": [{**entry(i.token, i.logprob),
                             "top_logprobs": [entry(t, lp) for t, lp in i.top.items()]} for i in items]}

    def _chat_stream(self, size, prompts, choices, req: ChatRequest, calls: ChatToolCalls) -> AsyncIterator[str]:
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": self.engine.model_id(size)}
        prelude = [{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                    "finish_reason": None} for c in choices]
        streams = [calls.stream() for _ in choices]

        def render(index: int, delta: StreamDelta) -> dict:
            return {**streams[index].delta(delta.text, delta.finish_reason),
                    "logprobs": self._chat_logprobs(delta.logprobs) if req.logprobs else None}

        return self._sse(size, prompts, choices, "chat", head, prelude, render, self._include_usage(req))

    # -- native ---------------------------------------------------------------------------------------------
    async def generate(self, req: GenerateRequest) -> dict:
        wanted = requested_size(self.engine, req, self.settings)
        prompts = [self.engine.tokenize(req.prompt)]
        max_tokens = self.settings.max_tokens_default if req.max_tokens is None else req.max_tokens
        self._check(prompts, max_tokens, req)
        size = self._choose(wanted, req, prompts, max_tokens)
        choices = self._choices(prompts, req, max_tokens, req.logprobs)
        results = await self._collect(size, choices, "generate")
        return {"model": self.engine.model_id(size), "num_layers": size,
                "outputs": [{"text": r.text, "finish_reason": r.finish_reason,
                             "completion_tokens": r.completion_tokens,
                             "logprobs": [{"token": i.token, "logprob": i.logprob, "top": i.top}
                                          for i in r.logprobs] if req.logprobs is not None else None}
                            for r in results],
                "usage": self._usage(prompts, sum(r.completion_tokens for r in results))}

    async def score(self, req: ScoreRequest) -> dict:
        size = self.engine.resolve_size(req.model, req.num_layers)
        prompts = self._tokenized(req.text)
        self._check(prompts, 0, SamplingFields())
        result = await self.engine.score(size, prompts[0], req.top_logprobs)
        scored = [lp for lp in result.logprobs if lp is not None]
        perplexity = math.exp(-sum(scored) / len(scored)) if scored else None
        self.metrics.count("score", self.engine.model_id(size), prompt_tokens=len(prompts[0]))
        return {"model": self.engine.model_id(size), "num_layers": size, "tokens": list(result.tokens),
                "token_ids": list(result.token_ids), "token_logprobs": list(result.logprobs),
                "top_logprobs": list(result.top_logprobs) if req.top_logprobs else None,
                "total_logprob": result.total, "perplexity": perplexity}

    # -- tokenizer ------------------------------------------------------------------------------------------
    def tokenize(self, req: TokenizeRequest) -> dict:
        if req.messages is not None:
            check_history(req.messages, self.engine)
            messages = template_messages(req.messages)
            text = self.engine.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt)
        else:
            text = req.prompt if req.prompt is not None else req.text
        tokens = self.engine.tokenize(text, add_special_tokens=req.add_special_tokens)
        strings = self.engine.token_strings(tokens) if req.return_token_strs else None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.context_limit(), "token_strs": strings}

    def detokenize(self, req: DetokenizeRequest) -> dict:
        text = self.engine.detokenize(req.tokens)
        return {"prompt": text, "text": text}

    def tokenizer_info(self) -> dict:
        return {**self.engine.tokenizer_info(), "max_model_len": self.context_limit()}
