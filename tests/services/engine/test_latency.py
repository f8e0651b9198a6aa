"""The latency model and the choice of a size, on recorded traces from a simulated machine (pure Python)."""

from __future__ import annotations

import random

import pytest

from services.engine.interface import ModelCard
from services.engine.latency import Budget, LatencyModel, Load, Observation, choose_size
from services.engine.step_times import StepModel

SIZES = list(range(16, 31))
CARDS = [ModelCard(f"f-{n}L", n, 0, parameters=20_000_000 + 4_000_000 * n, bytes=4 * (20_000_000 + 4_000_000 * n))
         for n in SIZES]
TRUE_S_PER_BYTE, TRUE_S_PER_PARAM_TOKEN = 1 / 10e9, 1 / 40e9


def _trace(sizes, count, seed=0, noise=0.05):
    """What a machine with the rates above serves: requests of random sizes and lengths, timed with noise."""
    rng, by_layers = random.Random(seed), {c.num_layers: c for c in CARDS}
    for _ in range(count):
        n, prompt, answer = rng.choice(sizes), rng.randint(8, 400), rng.randint(2, 200)
        card = by_layers[n]
        first = prompt * card.parameters * TRUE_S_PER_PARAM_TOKEN * rng.uniform(1 - noise, 1 + noise)
        decode = (answer - 1) * card.bytes * TRUE_S_PER_BYTE * rng.uniform(1 - noise, 1 + noise)
        yield Observation(n, prompt, answer, first, first + decode)


def test_sizes_never_served_are_predicted_from_the_others():
    model = LatencyModel(CARDS, max_concurrent=8)
    for obs in _trace([16, 30], 200):
        model.observe(obs)
    for n in (20, 23, 27):  # never observed
        card = CARDS[SIZES.index(n)]
        want_total = 100 * card.parameters * TRUE_S_PER_PARAM_TOKEN + 63 * card.bytes * TRUE_S_PER_BYTE
        got = model.predict(n, prompt_tokens=100, max_tokens=64)
        assert got.total_s == pytest.approx(want_total, rel=0.1)
        assert got.time_to_first_token_s == pytest.approx(100 * card.parameters * TRUE_S_PER_PARAM_TOKEN, rel=0.1)


def test_predictions_follow_the_machine_when_it_slows_down():
    model = LatencyModel(CARDS, max_concurrent=8)
    for obs in _trace(SIZES, 100):
        model.observe(obs)
    before = model.token_s(30)
    slower = [Observation(o.num_layers, o.prompt_tokens, o.completion_tokens, 2 * o.time_to_first_token_s,
                          2 * o.total_s) for o in _trace(SIZES, 40, seed=1)]
    for obs in slower:
        model.observe(obs)
    assert model.token_s(30) == pytest.approx(2 * before, rel=0.15)


def test_a_queue_beyond_the_free_slots_delays_the_first_token():
    model = LatencyModel(CARDS, max_concurrent=4)
    for obs in _trace(SIZES, 50):
        model.observe(obs)
    idle = model.predict(30, 100, 32, Load(running=2))
    full = model.predict(30, 100, 32, Load(running=4, waiting=8))
    assert full.time_to_first_token_s - idle.time_to_first_token_s == pytest.approx(9 * model.request_s / 4)
    assert full.total_s - idle.total_s == pytest.approx(full.time_to_first_token_s - idle.time_to_first_token_s)


def test_a_wait_for_a_slot_is_not_learned_as_prefill():
    model = LatencyModel(CARDS, max_concurrent=8)
    for obs in _trace(SIZES, 100):
        model.observe(obs)
    prefill = model.prefill_s(30, 100)
    for obs in _trace(SIZES, 40, seed=2):
        model.observe(Observation(obs.num_layers, obs.prompt_tokens, obs.completion_tokens,
                                  obs.time_to_first_token_s + 5.0, obs.total_s + 5.0, queued=True))
    assert model.prefill_s(30, 100) == pytest.approx(prefill)
    assert model.request_s < 5.0  # a slot's time excludes the wait before it


def test_the_largest_size_that_fits_is_chosen_never_below_the_floor():
    model = LatencyModel(CARDS, max_concurrent=8)
    for obs in _trace(SIZES, 200):
        model.observe(obs)
    budget_s = model.predict(23, 50, 64).total_s * 1.001
    assert choose_size(model, SIZES, 30, Budget(max_latency_s=budget_s), 50, 64)[0] == 23
    assert choose_size(model, SIZES, 20, Budget(max_latency_s=budget_s), 50, 64)[0] == 20  # capped by the ask
    assert choose_size(model, SIZES, 30, Budget(max_latency_s=1e-9), 50, 64)[0] == 16  # none fits: smallest
    assert choose_size(model, SIZES, 30, Budget(max_latency_s=1e-9, min_num_layers=25), 50, 64)[0] == 25
    assert choose_size(model, SIZES, 30, Budget(max_latency_s=1e9), 50, 64)[0] == 30
    ttft_s = model.predict(18, 400, 1).time_to_first_token_s * 1.001
    assert choose_size(model, SIZES, 30, Budget(max_time_to_first_token_s=ttft_s), 400, 1)[0] == 18
    crowded, _ = choose_size(model, SIZES, 30, Budget(max_latency_s=budget_s), 50, 64, Load(running=8, waiting=4))
    assert crowded < 23  # the same budget under a queue buys a smaller size


def test_before_any_request_decode_starts_from_the_model_cards_speed():
    cards = [ModelCard(c.id, c.num_layers, 0, c.parameters, c.bytes,
                       quality={"decode_tokens_per_s_cpu": 1 / (c.bytes * TRUE_S_PER_BYTE)}) for c in CARDS]
    model = LatencyModel(cards, max_concurrent=8)
    for n in (16, 23, 30):
        assert model.speed(n)["decode_tokens_per_s"] == pytest.approx(1 / (cards[n - 16].bytes * TRUE_S_PER_BYTE),
                                                                       rel=1e-3)


TRUE_STEP = StepModel(per_layer_s=1e-3, per_row_layer_s=2e-4)


def test_under_load_a_token_costs_the_step_of_the_batch_it_joins():
    model = LatencyModel(CARDS, max_concurrent=16)
    for obs in _trace(SIZES, 100):
        model.observe(obs)
    alone = model.token_s_at(30, Load(step_model=TRUE_STEP))
    assert alone == pytest.approx(TRUE_STEP.step_s(30, 30))
    crowded = Load(running=12, waiting=10, running_layers=(30,) * 12, step_model=TRUE_STEP)
    assert model.token_s_at(30, crowded) == pytest.approx(TRUE_STEP.step_s(30, 16 * 30))  # at most a full batch
    # beside the teacher's rows a small size still waits for the teacher's layers; it saves only its own rows
    beside_teacher = model.token_s_at(16, crowded)
    assert beside_teacher == pytest.approx(TRUE_STEP.step_s(30, 16 + 15 * 30))
    assert beside_teacher > model.token_s_at(16, Load(running=12, running_layers=(16,) * 12, step_model=TRUE_STEP))


def test_arriving_prefills_stretch_the_decode_and_the_rate_is_counted_over_a_window():
    model = LatencyModel(CARDS, max_concurrent=16)
    for obs in _trace(SIZES, 100):
        model.observe(obs)
    for i in range(50):
        model.arrive(now=100.0 + i * 0.2)  # 5 per second for 10 s
    assert model.arrivals_per_s(now=110.0) == pytest.approx(5.0, rel=0.05)
    assert model.arrivals_per_s(now=200.0) == 0.0
    quiet = model.token_s_at(30, Load(step_model=TRUE_STEP))
    busy = model.token_s_at(30, Load(step_model=TRUE_STEP, arrivals_per_s=0.5))
    share = 0.5 * model.prefill_s(30, round(model.prompt_tokens))
    assert 0 < share < 0.8
    assert busy == pytest.approx(quiet / (1 - share))
    flooded = model.token_s_at(30, Load(step_model=TRUE_STEP, arrivals_per_s=1e3))
    assert flooded == pytest.approx(quiet * 5)  # the stretch is bounded


def test_a_filling_batch_shrinks_the_size_before_a_queue_forms():
    """What the running average alone missed: at the start of a burst the finished requests were served by a
    small batch, so it predicts the teacher fits; the step fit sees the batch the request joins."""
    model = LatencyModel(CARDS, max_concurrent=16)
    for obs in _trace(SIZES, 100):
        model.observe(obs)
    budget = Budget(max_latency_s=model.predict(30, 50, 64, Load(step_model=TRUE_STEP)).total_s * 3)
    filling = dict(running=15, waiting=0, running_layers=(30,) * 15, arrivals_per_s=4.0)
    assert choose_size(model, SIZES, 30, budget, 50, 64, Load(**filling))[0] == 30  # the average: still fits
    assert choose_size(model, SIZES, 30, budget, 50, 64, Load(**filling, step_model=TRUE_STEP))[0] < 30


def test_the_stretch_counts_the_engines_own_prefill_time_not_the_first_tokens_waits():
    model = LatencyModel(CARDS, max_concurrent=16)
    for obs in _trace(SIZES, 100):
        model.observe(obs)
    waits = [Observation(o.num_layers, o.prompt_tokens, o.completion_tokens, 3 * o.time_to_first_token_s,
                         o.total_s + 2 * o.time_to_first_token_s) for o in _trace(SIZES, 60, seed=3)]
    for obs in waits:  # first tokens also waited two prefills' time for a step to end
        model.observe(obs)
    engine_rate = TRUE_S_PER_PARAM_TOKEN * CARDS[-1].parameters / 30  # the engine's own, per token and layer
    quiet = model.token_s_at(30, Load(step_model=TRUE_STEP))
    busy = model.token_s_at(30, Load(step_model=TRUE_STEP, arrivals_per_s=0.5, prefill_s_per_layer_token=engine_rate))
    share = 0.5 * engine_rate * round(model.prompt_tokens) * 30
    assert busy == pytest.approx(quiet / (1 - share))
    from_first_tokens = model.token_s_at(30, Load(step_model=TRUE_STEP, arrivals_per_s=0.5))
    assert from_first_tokens > busy  # what the stretch would have been without the engine's rate
