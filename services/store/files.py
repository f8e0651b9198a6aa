"""Files the store reads and writes beside the weights: JSON with one-line errors, and the student's layout file."""

from __future__ import annotations

import json
from pathlib import Path

from services.errors import InvalidPairError

STUDENT_CONFIG = "student_config.json"


def read_json(path: Path, what: str) -> dict:
    if not path.exists():
        raise InvalidPairError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InvalidPairError(f"{path} is not valid JSON: {error}") from error
