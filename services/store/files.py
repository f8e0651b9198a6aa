"""Files the store reads and writes beside the weights: JSON with one-line errors, written whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
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


def write_json(path: Path, data: dict) -> None:
    """Atomically: a reader (or a crash) sees the old file or the new one, never half of it."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(json.dumps(data, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `final`; once the block ends, its files are fsynced and it
    replaces `final` whole, so a reader (or a crash) sees the old folder or the new one, never half of one."""
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for path in tmp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
