"""sha256 checks and the safetensors-only rule for every weight file we load."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from services.errors import IntegrityError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    """The folder's safetensors files; refuses a folder that offers only pickled weights."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        detail = f" (found pickled {pickled}: convert them to safetensors)" if pickled else ""
        raise IntegrityError(f"no .safetensors weights in {folder}{detail}")
    return files


def hash_weights(folder: Path) -> dict[str, str]:
    return {path.name: sha256_file(path) for path in weight_files(folder)}


def verify_hashes(folder: Path, expected: Mapping[str, str]) -> None:
    """Every file named in `expected` exists with that sha256, and no other weight file is present."""
    actual_names = {path.name for path in weight_files(folder)}
    extra = actual_names - set(expected)
    if extra:
        raise IntegrityError(f"{folder} holds weight files its manifest does not list: {sorted(extra)}")
    for name, digest in expected.items():
        path = folder / name
        if not path.exists():
            raise IntegrityError(f"{path} is missing")
        actual = sha256_file(path)
        if actual != digest:
            raise IntegrityError(f"{path} sha256 {actual[:12]}… does not match the manifest's {digest[:12]}…")
