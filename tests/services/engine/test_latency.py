"""The latency model and the choice of a size, on recorded traces from a simulated machine (pure Python)."""

from __future__ import annotations

import random

import pytest

from services.engine.interface import ModelCard
from services.engine.latency import Budget, LatencyModel, Observation, choose_size

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
    idle = model.predict(30, 100, 32, running=2, waiting=0)
    full = model.predict(30, 100, 32, running=4, waiting=8)
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
    assert choose_size(model, SIZES, 30, Budget(max_latency_s=budget_s), 50, 64, 0, 0) == 23
    assert choose_size(model, SIZES, 20, Budget(max_latency_s=budget_s), 50, 64, 0, 0) == 20  # capped by the ask
    assert choose_size(model, SIZES, 30, Budget(max_latency_s=1e-9), 50, 64, 0, 0) == 16  # none fits: smallest
    assert choose_size(model, SIZES, 30, Budget(max_latency_s=1e-9, min_num_layers=25), 50, 64, 0, 0) == 25
    assert choose_size(model, SIZES, 30, Budget(max_latency_s=1e9), 50, 64, 0, 0) == 30
    ttft_s = model.predict(18, 400, 1).time_to_first_token_s * 1.001
    assert choose_size(model, SIZES, 30, Budget(max_time_to_first_token_s=ttft_s), 400, 1, 0, 0) == 18
    crowded = choose_size(model, SIZES, 30, Budget(max_latency_s=budget_s), 50, 64, running=8, waiting=4)
    assert crowded < 23  # the same budget under a queue buys a smaller size


def test_before_any_request_decode_starts_from_the_model_cards_speed():
    cards = [ModelCard(c.id, c.num_layers, 0, c.parameters, c.bytes,
                       quality={"decode_tokens_per_s_cpu": 1 / (c.bytes * TRUE_S_PER_BYTE)}) for c in CARDS]
    model = LatencyModel(cards, max_concurrent=8)
    for n in (16, 23, 30):
        assert model.speed(n)["decode_tokens_per_s"] == pytest.approx(1 / (cards[n - 16].bytes * TRUE_S_PER_BYTE),
                                                                       rel=1e-3)
