"""`--max-minutes`: the step count fitted from the timed first steps (pure), and a tiny run that keeps to it."""

import json

import pytest

from services.train.budget import TIMED_STEPS, TimeBudget
from services.train.loop import TrainConfig, run_training
from tests.services.train.test_training import corpus, tiny_config  # noqa: F401  (fixture)


def _observe_steps(budget: TimeBudget, step_seconds: float, steps: int) -> list[int | None]:
    """Steps that each take step_seconds, the first one twice as long (warm-up)."""
    now, answers = 2 * step_seconds, []
    for step in range(1, steps + 1):
        answers.append(budget.observe(step, now, started=0.0))
        now += step_seconds
    return answers


def test_the_total_is_fitted_once_from_the_steps_after_the_first():
    budget = TimeBudget(seconds=100.0, warmup_steps=2)
    answers = _observe_steps(budget, step_seconds=1.0, steps=20)
    fit_at = TIMED_STEPS + 1
    assert answers[fit_at - 1] == fit_at + (100 - (fit_at + 1))  # the slow first step is spent, not timed
    assert [a for i, a in enumerate(answers) if i != fit_at - 1] == [None] * 19


def test_the_fit_waits_for_the_end_of_the_lr_warm_up_and_a_step_budget_caps_it():
    budget = TimeBudget(seconds=100.0, warmup_steps=20, cap=30)
    answers = _observe_steps(budget, step_seconds=1.0, steps=25)
    assert answers.index(30) == 19 and answers.count(None) == 24


def test_a_budget_already_spent_ends_the_run_at_the_fit():
    assert _observe_steps(TimeBudget(seconds=1.0, warmup_steps=2), 1.0, 12)[TIMED_STEPS] == TIMED_STEPS + 1


def test_a_run_with_only_a_time_budget_keeps_to_it_and_decays_the_lr_to_its_end(llama_pair, corpus, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    summary = run_training(tiny_config(llama_pair[0], corpus, out, max_steps=None, max_minutes=0.05,
                                       warmup_steps=3, save_every=1000))
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    state = json.loads((out / "train_state.json").read_text())
    assert state["finished"] and state["total_steps"] == summary["steps"] == len(records) > TIMED_STEPS + 1
    assert summary["seconds"] < 0.05 * 60 * 1.5 + 2
    # each record logs the LR of the step after it: full from the warm-up's end, no decay before the fit
    assert all(r["lr"] == pytest.approx(3e-3) for r in records[2:TIMED_STEPS])
    assert records[TIMED_STEPS]["lr"] < 3e-3
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ends with the run


def test_a_run_needs_some_budget():
    config = TrainConfig(teacher="t", data="d", out="o")
    with pytest.raises(Exception, match="--max-minutes"):
        config.total_steps()
