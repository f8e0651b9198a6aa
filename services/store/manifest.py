"""`models_store/<pair>/manifest.json`: where a pair's teacher and student come from, and how they are checked."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from services.bounds import PENALTY_BOUNDS
from services.errors import InvalidPairError
from services.store.files import read_json, write_json
from services.store.integrity import verify_hashes
from services.store.student_pack import READABLE_FORMATS, unpack_student
from services.store.teacher_import import PackagedGGUF, import_teacher

MANIFEST = "manifest.json"
STORE_DIR = Path(__file__).resolve().parents[2] / "models_store"
DEFAULT_PAIR = STORE_DIR / "smollm2-135m-boomerang"


def cache_dir() -> Path:
    """Git-ignored home of converted teachers: `models_store/.cache` unless BOOMERANG_CACHE_DIR says otherwise."""
    return Path(os.environ.get("BOOMERANG_CACHE_DIR", STORE_DIR / ".cache"))


@dataclass(frozen=True)
class Manifest:
    """A pair as the store records it."""

    folder: Path
    name: str
    teacher: dict
    student: dict
    order: str | list[int] = "last"  # "last", "first" or a calibrated list of blocks
    dtype: str = "auto"
    quality: dict = field(default_factory=dict)
    sampling_defaults: dict = field(default_factory=dict)  # what a request that sets none of these gets

    @classmethod
    def read(cls, pair_dir: Path) -> Manifest:
        data = read_json(Path(pair_dir) / MANIFEST, MANIFEST)
        missing = {"name", "teacher", "student"} - set(data)
        if missing:
            raise InvalidPairError(f"{pair_dir / MANIFEST} lacks {sorted(missing)}")
        return cls(folder=Path(pair_dir), name=data["name"], teacher=data["teacher"], student=data["student"],
                   order=data.get("order", "last"), dtype=data.get("dtype", "auto"),
                   quality=data.get("quality", {}),
                   sampling_defaults=checked_sampling_defaults(data.get("sampling_defaults", {}), pair_dir))


SAMPLING_DEFAULTS = PENALTY_BOUNDS  # the fields a pair may set, each with the values a request may send


def checked_sampling_defaults(values: dict, pair_dir: Path) -> dict:
    """The manifest's `sampling_defaults`, refused with one clear error when a field is unknown or out of range."""
    for name, value in values.items():
        if name not in SAMPLING_DEFAULTS:
            raise InvalidPairError(f"{pair_dir / MANIFEST}: sampling_defaults.{name} is not one of "
                                   f"{sorted(SAMPLING_DEFAULTS)}")
        bounds = SAMPLING_DEFAULTS[name]
        if isinstance(value, bool) or not isinstance(value, int | float) or value not in bounds:
            raise InvalidPairError(f"{pair_dir / MANIFEST}: sampling_defaults.{name} must be a number in "
                                   f"{bounds}, got {value!r}")
    return dict(values)


def update_manifest(pair_dir: Path, change: Callable[[dict], None]) -> dict:
    """Read the pair's manifest, apply `change` to it in place, write it back atomically; returns it."""
    path = Path(pair_dir) / MANIFEST
    data = read_json(path, MANIFEST)
    change(data)
    write_json(path, data)
    return data


def packaged_teacher(entry: dict) -> PackagedGGUF:
    return PackagedGGUF(package=entry["package"], module=entry["module"], file=entry["file"],
                        sha256=entry["sha256"])


def resolve_teacher(manifest: Manifest) -> Path:
    """A verified teacher folder: imported from its registry package once, or a local path."""
    entry = manifest.teacher
    if entry.get("source") == "package":
        return import_teacher(packaged_teacher(entry), cache_dir() / entry["cache_name"])
    return _verified_folder(manifest.folder, entry, "teacher")


def resolve_student(manifest: Manifest, teacher_dir: Path) -> Path:
    """A verified student folder; a packed (int8) student is unpacked once into the cache."""
    folder = _verified_folder(manifest.folder, manifest.student, "student")
    if manifest.student.get("format") in READABLE_FORMATS:
        return unpack_student(folder, teacher_dir, cache_dir() / f"{manifest.name}-student")
    return folder


def _verified_folder(pair_dir: Path, entry: dict, role: str) -> Path:
    if "path" not in entry:
        raise InvalidPairError(f"manifest's {role} entry has no 'path'")
    folder = (pair_dir / entry["path"]).resolve()
    if not folder.is_dir():
        raise InvalidPairError(f"{role} folder not found: {folder}")
    if "sha256" not in entry:
        raise InvalidPairError(f"manifest's {role} entry has no 'sha256' for its weights")
    verify_hashes(folder, entry["sha256"])
    return folder
