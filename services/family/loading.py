"""Load teacher and student folders (Hugging Face layout, safetensors only) and check they form a pair."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from services.errors import InvalidPairError
from services.family.architectures import spec_for
from services.family.plan import StudentLayout, layout_from_student_config
from services.store.files import STUDENT_CONFIG, read_json
from services.store.integrity import weight_files

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None, device: str) -> torch.dtype:
    """fp32 on CPU (bf16 is emulated there), bf16 on GPUs, unless named."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise InvalidPairError(f"unknown dtype {name!r}; use one of {sorted(DTYPES)}", param="dtype")
    return DTYPES[name]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def read_model_config(folder: Path) -> dict:
    if not Path(folder).is_dir():
        raise InvalidPairError(f"model folder not found: {folder}")
    config = read_json(Path(folder) / "config.json", "config.json")
    spec_for(config.get("model_type", "?"))
    return config


def swap_parameters(model: nn.Module, replacement) -> list[nn.Parameter]:
    """Replace each parameter by `replacement(name, param)` (None keeps it). The choice is made once per
    tensor, so every tied name of it gets the same replacement; returns the replaced originals."""
    decided: dict[int, nn.Parameter | None] = {}
    originals: list[nn.Parameter] = []
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        if id(param) not in decided:
            decided[id(param)] = replacement(name, param)
            if decided[id(param)] is not None:
                originals.append(param)
        if decided[id(param)] is not None:
            module_name, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(module_name), attribute, decided[id(param)])
    return originals


def own_memory(model: nn.Module) -> nn.Module:
    """Copy every parameter into freshly allocated memory (tied ones stay tied): weights loaded from
    safetensors may live in file-backed pages, which decode reads more slowly."""
    swap_parameters(model, lambda _, param: nn.Parameter(param.data.clone(), requires_grad=param.requires_grad))
    return model


def load_model(folder: Path, dtype: torch.dtype, device: str, *, fresh_memory: bool = True) -> nn.Module:
    """A causal LM from safetensors only, no remote code, in eval mode; in memory of its own unless
    `fresh_memory` is false (the caller copies it once itself)."""
    from transformers import AutoModelForCausalLM

    read_model_config(folder)
    weight_files(Path(folder))
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, use_safetensors=True, trust_remote_code=False)
    model = model.to(device)
    if fresh_memory and model.device.type == "cpu":
        own_memory(model)
    return model.eval()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    if not Path(folder).is_dir():
        raise InvalidPairError(f"model folder not found: {folder}")
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def read_layout(student_dir: Path, num_teacher_layers: int) -> StudentLayout:
    return layout_from_student_config(
        read_json(Path(student_dir) / STUDENT_CONFIG, STUDENT_CONFIG), num_teacher_layers)


def check_pair(teacher_config: dict, student_config: dict, layout: StudentLayout) -> None:
    """Refuse pairs that cannot share modules: one line naming what differs."""
    for field in ("model_type", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads"):
        if teacher_config.get(field) != student_config.get(field):
            raise InvalidPairError(
                f"teacher and student differ in {field}: {teacher_config.get(field)} vs {student_config.get(field)}")
    if student_config.get("num_hidden_layers") != layout.num_student_layers:
        raise InvalidPairError(
            f"student has {student_config.get('num_hidden_layers')} layers but student_config.json copies "
            f"{layout.num_student_layers} teacher layers")


def check_tokenizers(teacher_tokenizer, student_tokenizer) -> None:
    if student_tokenizer is not None and teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise InvalidPairError("teacher and student tokenizers have different vocabularies")
