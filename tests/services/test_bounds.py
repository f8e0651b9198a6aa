"""Bounds on request values (pure Python)."""

from services.bounds import PENALTY_BOUNDS, Bounds


def test_bounds_include_their_high_end_and_their_low_end_unless_open():
    closed, open_low = Bounds(-2.0, 2.0), Bounds(0.0, 10.0, low_open=True)
    assert -2.0 in closed and 2.0 in closed and 2.01 not in closed
    assert 0.0 not in open_low and 1e-9 in open_low and 10.0 in open_low
    assert (str(closed), str(open_low)) == ("[-2, 2]", "(0, 10]")
    assert open_low.pydantic() == {"gt": 0.0, "le": 10.0} and closed.pydantic() == {"ge": -2.0, "le": 2.0}


def test_every_penalty_is_bounded_once():
    assert set(PENALTY_BOUNDS) == {"presence_penalty", "frequency_penalty", "repetition_penalty"}
