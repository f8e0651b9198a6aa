"""The engine on a tiny random pair: batching, scoring, stops, seeds, cancellation, overload."""

import asyncio

import pytest
import torch

from services.engine.engine import EngineLimits, InferenceEngine
from services.engine.interface import SamplingParams
from services.engine.logit_processors import apply_logit_processors
from services.errors import ContextLengthError, OverloadedError, UnknownSizeError
from services.family import load_family


@pytest.fixture(scope="module")
def engine(llama_pair):
    engine = InferenceEngine(load_family(*llama_pair, device="cpu", name="tiny"),
                             EngineLimits(max_concurrent=8, max_queue=4, batch_wait_ms=20))
    yield engine
    engine.close()


async def _run(engine, size, prompt_ids, params):
    text, tokens, finish = "", [], None
    async for delta in engine.generate(size, prompt_ids, params):
        text += delta.text
        tokens += delta.token_ids
        finish = delta.finish_reason or finish
    return text, tokens, finish


def _greedy_reference(model, prompt_ids, steps):
    ids = torch.tensor([prompt_ids])
    for _ in range(steps):
        with torch.no_grad():
            ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


PROMPTS = [[5, 17, 42], [99, 7, 3, 250, 61, 11, 8], [12], [40, 41, 42, 43, 44]]


def test_batched_greedy_equals_unbatched_reference(engine):
    size = engine.family.sizes[1]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def together():
        return await asyncio.gather(*[_run(engine, size, p, params) for p in PROMPTS])

    results = asyncio.run(together())
    model = engine.family.variant(size)
    for prompt, (_, tokens, finish) in zip(PROMPTS, results):
        assert tokens == _greedy_reference(model, prompt, 6)
        assert finish == "length"


def _adjusted_greedy_reference(model, prompt_ids, params, steps, eos_ids):
    answer: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + answer]), use_cache=False).logits[:, -1].float()  # [1, vocab]
        answer.append(int(apply_logit_processors(logits, [params], [prompt_ids], [answer], eos_ids).argmax()))
    return answer


def test_penalised_rows_batched_with_plain_ones_equal_their_offline_reference(engine):
    small, large = engine.family.sizes[0], engine.family.sizes[-1]
    plain = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    penalised = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, repetition_penalty=1.5,
                               presence_penalty=0.7, frequency_penalty=0.4, logit_bias=((7, 0.8),))
    requests = [(small, PROMPTS[0], plain), (large, PROMPTS[1], penalised), (small, PROMPTS[3], penalised),
                (large, PROMPTS[2], plain)]

    async def together():
        return await asyncio.gather(*[_run(engine, *request) for request in requests])

    for (size, prompt, params), (_, tokens, _) in zip(requests, asyncio.run(together())):
        model = engine.family.variant(size)
        assert tokens == _adjusted_greedy_reference(model, prompt, params, 8, engine.eos_ids)
    assert _adjusted_greedy_reference(engine.family.variant(large), PROMPTS[1], penalised, 8, engine.eos_ids) != \
        _greedy_reference(engine.family.variant(large), PROMPTS[1], 8), "the penalties changed nothing: vacuous"


def test_bias_min_tokens_and_stop_token_ids_end_where_asked(engine):
    size, eos = engine.family.sizes[0], min(engine.eos_ids)
    forced = SamplingParams(max_tokens=10, temperature=0, logit_bias=((eos, 100.0),), min_tokens=3)
    _, tokens, finish = asyncio.run(_run(engine, size, PROMPTS[0], forced))
    assert len(tokens) == 3 and eos not in tokens and finish == "stop"  # eos barred for 3 tokens, then taken
    first = _greedy_reference(engine.family.variant(size), PROMPTS[0], 1)[0]
    stopped = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, stop_token_ids=(first,))
    text, tokens, finish = asyncio.run(_run(engine, size, PROMPTS[0], stopped))
    assert (text, tokens, finish) == ("", [], "stop")


def test_score_equals_offline_variant(engine):
    prompt = PROMPTS[1]
    for size in engine.family.sizes:
        result = asyncio.run(engine.score(size, prompt))
        with torch.no_grad():
            logits = engine.family.variant(size)(torch.tensor([prompt]), use_cache=False).logits[0]
        expected = torch.log_softmax(logits, -1)[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        assert result.logprobs[0] is None
        torch.testing.assert_close(torch.tensor(result.logprobs[1:]), expected)


def test_seeded_sampling_is_reproducible(engine):
    size = engine.family.sizes[0]
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    first = asyncio.run(_run(engine, size, PROMPTS[0], params))
    second = asyncio.run(_run(engine, size, PROMPTS[0], params))
    assert first == second


def test_stop_string_truncates_and_finishes(engine):
    size = engine.family.sizes[0]
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    text, _, _ = asyncio.run(_run(engine, size, PROMPTS[0], greedy))
    stop = text[2:4]
    assert stop, text
    stopped, _, finish = asyncio.run(_run(engine, size, PROMPTS[0], SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True, stop=(stop,))))
    assert finish == "stop" and stopped == text[: text.find(stop)]


def test_cancelled_stream_frees_its_slot(engine):
    size = engine.family.sizes[0]

    async def abandon():
        stream = engine.generate(size, PROMPTS[0], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
        await anext(stream)
        await stream.aclose()
        for _ in range(200):
            if engine.stats()["running"] == 0:
                break
            await asyncio.sleep(0.01)

    for _ in range(10):
        asyncio.run(abandon())
    assert engine.stats()["in_flight"] == 0 and engine.stats()["running"] == 0


def test_overload_is_refused_and_limits_checked(engine):
    size = engine.family.sizes[0]

    async def flood():
        params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
        return await asyncio.gather(*[_run(engine, size, PROMPTS[0], params) for _ in range(20)],
                                    return_exceptions=True)

    results = asyncio.run(flood())
    refused = [r for r in results if isinstance(r, OverloadedError)]
    completed = [r for r in results if isinstance(r, tuple)]
    assert len(refused) == 20 - 12 and len(completed) == 12
    assert all(r[2] == "length" and len(r[1]) == 30 for r in completed)
    with pytest.raises(ContextLengthError):
        asyncio.run(_run(engine, size, [1] * 10, SamplingParams(max_tokens=10_000)))
    with pytest.raises(UnknownSizeError):
        engine.resolve_size("tiny-99L", None)
    assert engine.resolve_size("tiny", None) == max(engine.family.sizes)
    assert engine.resolve_size("tiny-6L", 6) == 6


def test_without_mixing_each_size_has_its_own_batch_and_late_arrivals_join_theirs(llama_pair):
    batches: list[tuple[int, int]] = []
    engine = InferenceEngine(load_family(*llama_pair, device="cpu", name="tiny"),
                             EngineLimits(max_concurrent=16, max_queue=16, max_batch_size=8, batch_wait_ms=50,
                                         mix_sizes=False),
                             on_batch=lambda n, size: batches.append((n, size)))
    sizes = engine.family.sizes[:3]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)

    async def mixed():
        first = [_run(engine, sizes[i % 3], PROMPTS[i % 4], params) for i in range(12)]
        wave = asyncio.gather(*first)
        while len(batches) < 3:  # the first batches are running: the late ones gather for the next ones
            await asyncio.sleep(0.005)
        late = await asyncio.gather(*[_run(engine, sizes[i % 3], PROMPTS[0], params) for i in range(6)])
        return await wave, late

    try:
        early, late = asyncio.run(mixed())
    finally:
        engine.close()
    assert all(len(r[1]) == 20 for r in early + late)
    assert sorted(size for _, size in batches[:3]) == [4, 4, 4]
    assert {key for key, _ in batches} == set(sizes)  # a key per size, never "mixed"
    assert len(batches) <= 6, batches


def test_vanishing_temperature_is_greedy_not_a_crash(engine):
    size = engine.family.sizes[0]
    greedy = asyncio.run(_run(engine, size, PROMPTS[0], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)))
    tiny = asyncio.run(_run(engine, size, PROMPTS[0], SamplingParams(max_tokens=5, temperature=7e-273, seed=1,
                                                                     ignore_eos=True)))
    assert tiny == greedy


def test_the_engine_times_its_steps_and_reports_running_rows(engine):
    sizes = engine.family.sizes
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    seen: list[list[int]] = []

    async def traffic(count: int):
        async def watch():
            for _ in range(50):
                seen.append(engine.stats()["running_layers"])
                await asyncio.sleep(0.002)
        runs = [_run(engine, sizes[i % len(sizes)], PROMPTS[i % len(PROMPTS)], params) for i in range(count)]
        await asyncio.gather(watch(), *runs)

    before = engine.step_times.steps
    for count in (1, 3, 6):
        asyncio.run(traffic(count))
    assert any(seen) and all(n in sizes for rows in seen for n in rows)
    assert engine.step_times.steps - before >= 3 * (params.max_tokens - 1)  # every decode step was timed
    assert "step_model" in engine.stats()  # None or a fit: a tiny model's steps are all overhead
    assert engine.stats()["prefill_s_per_layer_token"] > 0  # every prefill timed against its prompts' tokens
