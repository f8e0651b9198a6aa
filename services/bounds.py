"""Bounds on request values that several layers check (the request schema, a pair's manifest): written once,
below them all, like `services.errors`. Pure Python."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Bounds:
    """The values a number may take: `low` excluded where `low_open`, `high` included."""

    low: float
    high: float
    low_open: bool = False

    def __contains__(self, value: float) -> bool:
        return (self.low < value if self.low_open else self.low <= value) and value <= self.high

    def __str__(self) -> str:
        return f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"

    def pydantic(self) -> dict:
        """As pydantic's `Field` constraints."""
        return {"gt" if self.low_open else "ge": self.low, "le": self.high}


# the penalties a request may send and a pair may set as its default (`sampling_defaults`)
PENALTY_BOUNDS = {"presence_penalty": Bounds(-2.0, 2.0), "frequency_penalty": Bounds(-2.0, 2.0),
                  "repetition_penalty": Bounds(0.0, 10.0, low_open=True)}
