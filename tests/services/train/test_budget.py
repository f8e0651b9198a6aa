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


def test_the_total_is_fitted_from_the_steps_after_the_first():
    budget = TimeBudget(seconds=100.0, warmup_steps=2)
    answers = _observe_steps(budget, step_seconds=1.0, steps=TIMED_STEPS + 1)
    fit_at = TIMED_STEPS + 1
    assert answers[fit_at - 1] == fit_at + (100 - (fit_at + 1))  # the slow first step is spent, not timed
    assert answers[:fit_at - 1] == [None] * (fit_at - 1)


def test_a_run_resumed_past_the_fit_point_without_a_count_is_fitted_at_its_second_step():
    budget = TimeBudget(seconds=100.0, warmup_steps=2)
    assert budget.observe(30, 5.0, started=0.0) is None
    assert budget.observe(31, 6.0, started=0.0) == 31 + 94


def test_the_fit_waits_for_the_end_of_the_lr_warm_up_and_a_step_budget_caps_it():
    budget = TimeBudget(seconds=100.0, warmup_steps=20, cap=30)
    answers = _observe_steps(budget, step_seconds=1.0, steps=20)
    assert answers.index(30) == 19 and answers.count(None) == 19


def test_a_budget_already_spent_ends_the_run_at_the_fit():
    assert _observe_steps(TimeBudget(seconds=1.0, warmup_steps=2), 1.0, 12)[TIMED_STEPS] == TIMED_STEPS + 1


def test_a_run_with_only_a_time_budget_keeps_to_it_and_decays_the_lr_to_its_end(llama_pair, corpus, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    summary = run_training(tiny_config(llama_pair[0], corpus, out, max_steps=None, max_minutes=0.05,
                                       warmup_steps=3, save_every=1000))
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    state = json.loads((out / "train_state.json").read_text())
    # the fit comes after the timed steps; how many more fit depends on this machine's speed and load
    assert state["finished"] and state["total_steps"] == summary["steps"] == len(records) >= TIMED_STEPS + 1
    # each record logs the LR of the step after it: full from the warm-up's end, no decay before the fit
    assert all(r["lr"] == pytest.approx(3e-3) for r in records[2:TIMED_STEPS])
    assert records[TIMED_STEPS]["lr"] < 3e-3
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ends with the run


def test_a_run_needs_some_budget():
    config = TrainConfig(teacher="t", data="d", out="o")
    with pytest.raises(Exception, match="--max-minutes"):
        config.total_steps()


def test_a_resumed_run_keeps_the_step_count_fitted_before_the_stop(llama_pair, corpus, tmp_path):  # noqa: F811
    import shutil

    out, checkpoint = tmp_path / "run", f"step-{TIMED_STEPS + 2:07d}"
    # an hour's budget capped at 20 steps: the fit says 20, whatever this machine's speed
    settings = dict(max_minutes=60.0, warmup_steps=3, save_every=TIMED_STEPS + 2)
    assert run_training(tiny_config(llama_pair[0], corpus, out, max_steps=20, **settings))["steps"] == 20
    for folder in (out / "checkpoints").glob("step-*"):  # as if it had died after its checkpoint past the fit
        if folder.name != checkpoint:
            shutil.rmtree(folder)
    state = json.loads((out / "train_state.json").read_text())
    (out / "train_state.json").write_text(json.dumps({**state, "finished": False}))
    # without the cap a new fit would run for an hour; the checkpointed count ends it at 20
    resumed = run_training(tiny_config(llama_pair[0], corpus, out, max_steps=None, resume=True, **settings))
    assert resumed["steps"] == 20


def test_a_checkpoint_from_before_the_fit_resumes_and_fits_then(llama_pair, corpus, tmp_path, monkeypatch):  # noqa: F811
    from services.train import loop

    out, original = tmp_path / "run", loop.Trainer.train_step

    def dies_after_step_five(trainer):
        if trainer.step == 5:
            raise RuntimeError("killed")
        return original(trainer)
    monkeypatch.setattr(loop.Trainer, "train_step", dies_after_step_five)
    with pytest.raises(RuntimeError, match="killed"):  # an hour's budget, no cap; checkpoint at step 4
        run_training(tiny_config(llama_pair[0], corpus, out, max_steps=None, max_minutes=60.0, warmup_steps=3,
                                 save_every=4))
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    # the step-4 checkpoint holds no count yet; the resumed run fits one (here capped at 12 steps)
    resumed = run_training(tiny_config(llama_pair[0], corpus, out, max_steps=12, max_minutes=60.0, warmup_steps=3,
                                       save_every=4, resume=True))
    assert resumed["steps"] == 12
