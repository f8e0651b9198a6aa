"""Atomic, verified training checkpoints: a SIGKILL at any moment leaves the previous one intact."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from services.store.files import atomic_folder
from services.store.integrity import sha256_file

log = logging.getLogger(__name__)
WEIGHTS, STATE, META = "student.safetensors", "state.pt", "meta.json"


@dataclass
class Checkpoint:
    step: int
    folder: Path
    state: dict  # optimizer, scheduler, rng, tokens seen

    def load_weights_into(self, model: nn.Module) -> None:
        load_model(model, self.folder / WEIGHTS)


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:07d}"


def save_checkpoint(root: Path, step: int, model: nn.Module, state: dict, keep: int = 2) -> Path:
    """The folder either exists whole or not at all; only the `keep` latest are kept."""
    root.mkdir(parents=True, exist_ok=True)
    final = _step_dir(root, step)
    with atomic_folder(final) as tmp:
        save_model(model, str(tmp / WEIGHTS))  # handles tied tensors
        torch.save(state, tmp / STATE)
        meta = {"step": step, "sha256": {name: sha256_file(tmp / name) for name in (WEIGHTS, STATE)}}
        (tmp / META).write_text(json.dumps(meta))
    for old in sorted(root.glob("step-???????"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _verified(folder: Path) -> bool:
    try:
        meta = json.loads((folder / META).read_text())
        return all(sha256_file(folder / name) == digest for name, digest in meta["sha256"].items())
    except (OSError, ValueError, KeyError):
        return False


def load_latest(root: Path) -> Checkpoint | None:
    """The newest checkpoint whose hashes verify; corrupted ones are reported and skipped."""
    for folder in sorted(root.glob("step-???????"), reverse=True):
        if not _verified(folder):
            log.warning("checkpoint %s is incomplete or corrupted; trying the previous one", folder.name)
            continue
        state = torch.load(folder / STATE, weights_only=True)
        return Checkpoint(int(folder.name.split("-")[1]), folder, state)
    return None
