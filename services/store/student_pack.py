"""A compact on-disk form for students: int8 per-output-channel matrices, and no copy of tensors that are
bit-identical to the teacher's (embeddings frozen during training). Unpacked once into an fp32 HF folder.

A student starts as its teacher's kept layers and stays near them, so each matrix is stored as its
difference from the teacher's matrix it began as (`delta_from` in pack.json): int8 rounding then errs on
that small difference, not on the whole weight, and a fine-tuning step smaller than the rounding error of
the whole weight survives packing.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from services.errors import IntegrityError
from services.store.files import STUDENT_CONFIG, atomic_folder
from services.store.integrity import hash_weights, sha256_file, verify_hashes, weight_files

PACK_FORMAT = "boomerang-int8-v2"  # v2: matrices stored as deltas from the teacher's (`delta_from`)
READABLE_FORMATS = ("boomerang-int8-v1", PACK_FORMAT)
PACKED_WEIGHTS = "weights.int8.safetensors"
PACK_INFO = "pack.json"
SCALE_SUFFIX = ".__scale"
CONFIG_FILES = ("config.json", "generation_config.json", STUDENT_CONFIG)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
LOCK = "boomerang-unpack.json"


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        tensors.update(load_file(path))
    return tensors


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: weight [out, in] ~= q [out, in] * scale [out, 1]."""
    scale = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127.0  # [out, 1]
    return torch.round(weight.float() / scale).clamp(-127, 127).to(torch.int8), scale[:, 0]


def teacher_origin(name: str, kept_layers: list[int]) -> str:
    """The teacher tensor a student tensor began as: student layer i is teacher layer kept_layers[i]."""
    return re.sub(r"\.layers\.(\d+)\.", lambda m: f".layers.{kept_layers[int(m.group(1))]}.", name, count=1)


def pack_student(student_dir: Path, teacher_dir: Path, out_dir: Path) -> dict:
    """Write the packed student; returns its pack info (what was quantised, against what, what is shared)."""
    student, teacher = read_weights(Path(student_dir)), read_weights(Path(teacher_dir))
    kept = json.loads((Path(student_dir) / STUDENT_CONFIG).read_text())["copied_teacher_layers"]
    packed: dict[str, torch.Tensor] = {}
    shared, quantized, delta_from = [], [], {}
    for name, tensor in student.items():
        if name in teacher and teacher[name].shape == tensor.shape and torch.equal(teacher[name], tensor):
            shared.append(name)
        elif tensor.dim() == 2 and tensor.is_floating_point():
            origin = teacher_origin(name, kept)
            if origin in teacher and teacher[origin].shape == tensor.shape:
                delta_from[name] = origin
                tensor = tensor.float() - teacher[origin].float()  # [out, in]
            packed[name], packed[name + SCALE_SUFFIX] = quantize_rows(tensor)
            quantized.append(name)
        else:
            packed[name] = tensor.float().contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(packed, out_dir / PACKED_WEIGHTS)
    for name in CONFIG_FILES:
        shutil.copy(Path(student_dir) / name, out_dir / name)
    info = {"format": PACK_FORMAT, "shared_with_teacher": sorted(shared), "quantized": sorted(quantized),
            "delta_from": delta_from}
    (out_dir / PACK_INFO).write_text(json.dumps(info, indent=2) + "\n")
    return info


def unpack_student(packed_dir: Path, teacher_dir: Path, out_dir: Path) -> Path:
    """Rebuild an fp32 HF student folder (reused while its lock still matches the packed weights)."""
    packed_dir, out_dir = Path(packed_dir), Path(out_dir)
    source_hashes = {**hash_weights(packed_dir), **{name: sha256_file(packed_dir / name) for name in CONFIG_FILES}}
    lock = out_dir / LOCK
    if lock.exists():
        record = json.loads(lock.read_text())
        if record.get("source_sha256") == source_hashes:
            verify_hashes(out_dir, record["sha256"])
            return out_dir
    info = json.loads((packed_dir / PACK_INFO).read_text())
    if info.get("format") not in READABLE_FORMATS:
        raise IntegrityError(f"{packed_dir} is not a packed student ({', '.join(READABLE_FORMATS)})")
    packed, teacher = load_file(packed_dir / PACKED_WEIGHTS), read_weights(Path(teacher_dir))
    weights = {name: teacher[name] for name in info["shared_with_teacher"]}
    delta_from = info.get("delta_from", {})
    for name, tensor in packed.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = packed.get(name + SCALE_SUFFIX)
        weights[name] = tensor.float() * scale[:, None] if scale is not None else tensor  # [out, in]
        if name in delta_from:
            weights[name] = weights[name] + teacher[delta_from[name]].float()  # [out, in]
    with atomic_folder(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        for name in CONFIG_FILES:
            shutil.copy(packed_dir / name, tmp / name)
        for name in TOKENIZER_FILES:
            if (Path(teacher_dir) / name).exists():
                shutil.copy(Path(teacher_dir) / name, tmp / name)
        (tmp / LOCK).write_text(json.dumps({"source_sha256": source_hashes, "sha256": hash_weights(tmp)}, indent=2))
    return out_dir
