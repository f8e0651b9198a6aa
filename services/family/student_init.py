"""Make a student from a teacher by keeping the layers of a layout (weights copied, or random)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from torch import nn

from services.errors import TrainingConfigError
from services.family.architectures import PER_LAYER_CONFIG_FIELDS, get_path, number_layers, set_path, spec_for
from services.family.loading import read_layout
from services.family.plan import StudentLayout
from services.store.files import STUDENT_CONFIG
from services.store.integrity import weight_files


def init_student(teacher: nn.Module, layout: StudentLayout, random_init: bool = False) -> nn.Module:
    """A deep copy of the teacher holding only the kept layers, renumbered 0..S-1."""
    spec = spec_for(teacher.config.model_type)
    student = copy.deepcopy(teacher)
    layers = get_path(student, spec.layers)
    set_path(student, spec.layers, nn.ModuleList([layers[i] for i in layout.copied_teacher_layers]))
    student.config.num_hidden_layers = layout.num_student_layers
    for field in PER_LAYER_CONFIG_FIELDS:
        values = getattr(student.config, field, None)
        if values is not None:
            setattr(student.config, field, [values[i] for i in layout.copied_teacher_layers])
    number_layers(student, spec.layers)
    if random_init:
        student.apply(student._init_weights)
        student.tie_weights()
    return student


def save_student(student: nn.Module, layout: StudentLayout, out_dir: Path, tokenizer=None) -> None:
    """An HF folder with the paper's `student_config.json` at its top."""
    out_dir = Path(out_dir)
    student.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    (out_dir / STUDENT_CONFIG).write_text(json.dumps(layout.to_student_config(), indent=2) + "\n")


def load_student_weights(student: nn.Module, folder: Path, layout: StudentLayout) -> None:
    """Start from a trained student (safetensors only) whose `student_config.json` has the same layout."""
    from safetensors.torch import load_file

    if read_layout(folder, layout.num_teacher_layers) != layout:
        raise TrainingConfigError(f"{folder} was made with a different layout than this run's")
    weights: dict = {}
    for path in weight_files(folder):
        weights.update(load_file(path))
    missing, unexpected = student.load_state_dict(weights, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]  # a tied head is saved once, as the embedding
    if missing or unexpected:
        raise TrainingConfigError(f"{folder} does not match the student: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}")
