"""A compact on-disk form for students: int8 per-output-channel matrices, and no copy of tensors that are
bit-identical to the teacher's (embeddings frozen during training). Unpacked once into an fp32 HF folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from services.errors import IntegrityError
from services.store.files import STUDENT_CONFIG, atomic_folder
from services.store.integrity import hash_weights, sha256_file, verify_hashes, weight_files

PACK_FORMAT = "boomerang-int8-v1"
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


def pack_student(student_dir: Path, teacher_dir: Path, out_dir: Path) -> dict:
    """Write the packed student; returns its pack info (what was quantised, what is shared)."""
    student, teacher = read_weights(Path(student_dir)), read_weights(Path(teacher_dir))
    packed: dict[str, torch.Tensor] = {}
    shared, quantized = [], []
    for name, tensor in student.items():
        if name in teacher and teacher[name].shape == tensor.shape and torch.equal(teacher[name], tensor):
            shared.append(name)
        elif tensor.dim() == 2 and tensor.is_floating_point():
            packed[name], packed[name + SCALE_SUFFIX] = quantize_rows(tensor)
            quantized.append(name)
        else:
            packed[name] = tensor.float().contiguous()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(packed, out_dir / PACKED_WEIGHTS)
    for name in CONFIG_FILES:
        shutil.copy(Path(student_dir) / name, out_dir / name)
    info = {"format": PACK_FORMAT, "shared_with_teacher": sorted(shared), "quantized": sorted(quantized)}
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
    if info.get("format") != PACK_FORMAT:
        raise IntegrityError(f"{packed_dir} is not a {PACK_FORMAT} student")
    packed, teacher = load_file(packed_dir / PACKED_WEIGHTS), read_weights(Path(teacher_dir))
    weights = {name: teacher[name] for name in info["shared_with_teacher"]}
    for name, tensor in packed.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = packed.get(name + SCALE_SUFFIX)
        weights[name] = tensor.float() * scale[:, None] if scale is not None else tensor  # [out, in]
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
