"""The bench's structured-output cost: the serving batch with and without a json_object grammar."""

import pytest

from services.bench import structured_cost
from services.bench.structured_cost import structured_output_cost
from services.family import load_family


def test_cost_compares_the_two_rates_and_the_grammar_is_applied(llama_pair, monkeypatch):
    family = load_family(*llama_pair, device="cpu")
    outputs = []
    real = structured_cost._seconds_per_token

    def recording(family, prompt, steps, matcher, pool):
        seconds = real(family, prompt, steps, matcher, pool)
        outputs.append((matcher is not None, seconds))
        return seconds

    monkeypatch.setattr(structured_cost, "_seconds_per_token", recording)
    report = structured_output_cost(family, steps=6, rounds=2)
    assert [constrained for constrained, _ in outputs] == [False, True, False, True]  # alternating
    plain = 1 / min(s for c, s in outputs if not c)
    constrained = 1 / min(s for c, s in outputs if c)
    assert report["plain_tok_s_b1"] == pytest.approx(plain)
    assert report["json_object_tok_s_b1"] == pytest.approx(constrained)
    assert report["cost_fraction"] == pytest.approx(1 - constrained / plain)
    assert report["num_layers"] == min(family.sizes)
