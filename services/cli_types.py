"""Argument types shared by the `boomerang` subcommands."""

from __future__ import annotations

import argparse


def layer_counts(value: str) -> tuple[int, ...]:
    """Comma-separated integers ("16,18,20"): layer counts or layer indices."""
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
