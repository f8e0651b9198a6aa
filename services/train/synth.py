"""`boomerang synth`: the teacher's own samples as JSONL training text, written round by round, resumable.

Distilling on text the teacher writes itself (sampled from the start token at temperature 1) covers what it
knows beyond one corpus; a resumed run continues with the next round's seed, so the file is the same either way.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from services.errors import TrainingConfigError
from services.family.loading import default_device, load_model, load_tokenizer, parse_dtype

log = logging.getLogger(__name__)
MIN_SAMPLE_TOKENS = 16  # shorter samples (an immediate end of text) are dropped


@dataclass(frozen=True)
class SynthConfig:
    teacher: str
    out: str
    tokens: int  # stop once this many sampled tokens are written
    batch_size: int = 256
    max_new_tokens: int = 256
    temperature: float = 1.0
    seed: int = 0
    max_minutes: float | None = None  # or stop after the round that passes this wall-clock budget
    device: str | None = None
    resume: bool = False
    answer_num_layers: tuple[int, ...] = ()  # chat only: answers written by these sizes of `pair`'s family
    pair: str | None = None  # the pair whose sizes answer (None: the default pair)


def check_config(config: SynthConfig) -> None:
    if config.tokens < 1 or config.batch_size < 1 or config.max_new_tokens < MIN_SAMPLE_TOKENS:
        raise TrainingConfigError(f"need --tokens >= 1, --batch-size >= 1, --max-new-tokens >= {MIN_SAMPLE_TOKENS}")


def done_so_far(path: Path, config: SynthConfig) -> tuple[int, int]:
    """(rounds, tokens) already in the file; refuses to touch one that is not being resumed."""
    if not path.exists():
        return 0, 0
    if not config.resume:
        raise TrainingConfigError(f"{path} exists: pass --resume to continue it")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return (max((r["round"] for r in records), default=-1) + 1, sum(r["tokens"] for r in records))


def _texts(rows: torch.Tensor, end_ids: set[int], tokenizer) -> list[tuple[str, int]]:
    """Each row cut at its first end token; (text, token count) of the rows long enough to keep."""
    kept = []
    for row in rows.tolist():
        ends = [i for i, token in enumerate(row) if token in end_ids]
        row = row[: ends[0]] if ends else row
        if len(row) >= MIN_SAMPLE_TOKENS:
            kept.append((tokenizer.decode(row), len(row)))
    return kept


def sample_round(model, tokenizer, config: SynthConfig, round_index: int) -> torch.Tensor:
    """One batch of samples from the start token: [batch_size, max_new_tokens] token ids."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompt = torch.full((config.batch_size, 1), start, device=model.device)  # [batch, 1]
    torch.manual_seed(config.seed * 1_000_003 + round_index)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                         temperature=config.temperature, top_k=0, top_p=1.0,
                         max_new_tokens=config.max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    return out[:, 1:].cpu()  # [batch, <= max_new_tokens]


def synthesize(config: SynthConfig) -> dict:
    """Write rounds of samples until the token or time budget is met; returns a summary."""
    check_config(config)
    path = Path(config.out)
    rounds, tokens = done_so_far(path, config)
    device = config.device or default_device()
    tokenizer = load_tokenizer(config.teacher)
    model = load_model(config.teacher, parse_dtype("auto", device), device)
    end_ids = set(tokenizer.all_special_ids)  # a sample ends at the first special token it writes
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    while tokens < config.tokens and not out_of_time(config, start):
        with torch.no_grad():
            kept = _texts(sample_round(model, tokenizer, config, rounds), end_ids, tokenizer)
        with open(path, "a", encoding="utf-8") as handle:
            for text, count in kept:
                handle.write(json.dumps({"text": text, "tokens": count, "round": rounds}) + "\n")
        tokens += sum(count for _, count in kept)
        rounds += 1
        log.info("round %d: %d samples kept, %d tokens in all, %.0f s", rounds, len(kept), tokens,
                 time.monotonic() - start)
    return {"rounds": rounds, "tokens": tokens, "seconds": round(time.monotonic() - start, 1), "out": str(path)}


def out_of_time(config: SynthConfig, start: float) -> bool:
    return config.max_minutes is not None and time.monotonic() - start >= config.max_minutes * 60
