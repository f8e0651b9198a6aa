"""The online fit of decode step times and the prefill rate (pure Python)."""

from __future__ import annotations

import random

import pytest

from services.engine.step_times import MIN_PREFILLS, MIN_STEPS, PrefillRate, StepModel, StepTimes

TRUE = StepModel(per_layer_s=2e-3, per_row_layer_s=3e-4)


def _steps(model: StepModel, count: int, seed: int = 0, noise: float = 0.03):
    """Steps of random batches mixing sizes, timed by `model` with noise."""
    rng = random.Random(seed)
    for _ in range(count):
        rows = [rng.choice(range(16, 31)) for _ in range(rng.randint(1, 16))]
        yield rows, model.step_s(max(rows), sum(rows)) * rng.uniform(1 - noise, 1 + noise)


def test_the_fit_recovers_both_rates_from_mixed_batches():
    times = StepTimes()
    for rows, seconds in _steps(TRUE, 300):
        times.observe(rows, seconds)
    fitted = times.model()
    assert fitted.per_layer_s == pytest.approx(TRUE.per_layer_s, rel=0.1)
    assert fitted.per_row_layer_s == pytest.approx(TRUE.per_row_layer_s, rel=0.1)


def test_no_fit_until_enough_steps_of_different_batches():
    times = StepTimes()
    for rows, seconds in _steps(TRUE, MIN_STEPS - 1):
        times.observe(rows, seconds)
    assert times.model() is None
    one_shape = StepTimes()
    for _ in range(200):  # every step one row of one size: the two rates cannot be told apart
        one_shape.observe([30], TRUE.step_s(30, 30))
    assert one_shape.model() is None
    times.observe([], 1.0)  # an empty step teaches nothing
    times.observe([30], 0.0)
    assert times.model() is None


def test_the_fit_follows_a_machine_that_slows_down():
    times = StepTimes()
    for rows, seconds in _steps(TRUE, 300):
        times.observe(rows, seconds)
    slower = StepModel(2 * TRUE.per_layer_s, 2 * TRUE.per_row_layer_s)
    for rows, seconds in _steps(slower, 1500, seed=1):
        times.observe(rows, seconds)
    assert times.model().step_s(30, 16 * 30) == pytest.approx(slower.step_s(30, 16 * 30), rel=0.1)


def test_the_prefill_rate_is_trusted_after_a_few_prefills_and_follows_the_newest():
    rate = PrefillRate()
    for _ in range(MIN_PREFILLS - 1):
        rate.observe(30 * 100, 30 * 100 * 2e-5)
    assert rate.seconds_per_layer_token() is None
    rate.observe(16 * 40, 16 * 40 * 2e-5)
    assert rate.seconds_per_layer_token() == pytest.approx(2e-5)
    rate.observe(0, 1.0)  # an empty prefill teaches nothing
    for _ in range(60):  # the machine became twice as slow
        rate.observe(30 * 100, 30 * 100 * 4e-5)
    assert rate.seconds_per_layer_token() == pytest.approx(4e-5, rel=0.01)
