"""The open-loop load bench's pure parts: seeded Poisson arrivals, per-load summaries and the goals read from
them (the servers themselves run in `boomerang bench --load`, not in CI)."""

import pytest

from services.bench.load import Outcome, arrivals, load_goals, summarize


def test_arrivals_are_seeded_poisson_at_the_asked_rate():
    first, again = arrivals(40.0, 50.0, seed=3), arrivals(40.0, 50.0, seed=3)
    assert first == again and first != arrivals(40.0, 50.0, seed=4)
    assert 1800 < len(first) < 2200  # 2000 expected
    times = [a.at_s for a in first]
    assert times == sorted(times) and times[-1] < 50.0
    assert {a.max_tokens for a in first} == {16, 32, 64} and len({a.prompt for a in first}) == len(first)


def test_a_load_is_summarised_as_goodput_rejections_and_sizes():
    outcomes = [Outcome(200, 0.5, 30), Outcome(200, 3.0, 30), Outcome(200, 0.4, 16), Outcome(429, 0.01, None),
                Outcome(0, 1.0, None)]
    row = summarize(outcomes, seconds=2.0, target_s=1.0, quality={16: 7.0, 30: 2.0})
    assert row["ok"] == 3 and row["rejected_429"] == 1 and row["other_failures"] == 1
    assert row["within_target"] == pytest.approx(2 / 5) and row["goodput_per_s"] == pytest.approx(1.0)
    assert row["mean_num_layers"] == pytest.approx(76 / 3) and row["share_largest"] == pytest.approx(2 / 3)
    assert row["mean_answer_perplexity"] == pytest.approx(11 / 3) and row["p50_s"] == 0.5


def test_goals_compare_the_elastic_server_with_the_best_teacher_only_one():
    def row(goodput, within=1.0, rejected=0, largest=1.0):
        return {"goodput_per_s": goodput, "within_target": within, "rejected_429": rejected, "share_largest": largest}

    report = {"multiples": [0.5, 1.0, 2.0], "speed_range": 1.5, "servers": {
        "elastic": {"0.5": row(5), "1.0": row(9, largest=0.9), "2.0": row(12, within=0.8, rejected=3)},
        "teacher_reject": {"0.5": row(5), "1.0": row(10), "2.0": row(6)},
        "teacher_queue": {"0.5": row(5), "1.0": row(8), "2.0": row(2)}}}
    goals = load_goals(report)
    assert goals["elastic_teacher_share_at_most_1x"] == 0.9
    assert goals["elastic_within_target_in_range"] == 1.0 and goals["elastic_rejections_in_range"] == 0
    assert goals["elastic_goodput_over_best_teacher_only_min"] == pytest.approx(0.9)
