"""Calibration text for the baselines: training text, never the held-out evaluation text."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.corpora import DEFAULT_HELD_OUT_PLAY, read_documents, resolve_paths
from services.errors import InvalidRequestError

SKIP_TOKENS = 512  # front matter (the licence header of a Gutenberg play)


@dataclass(frozen=True)
class CalibrationText:
    data: str  # a `--data` spec of `services.corpora`: "shakespeare" is the plays without The Tempest
    chunks: torch.Tensor  # [chunks, seq_len]
    files: tuple[str, ...]  # the files the windows came from

    def describe(self) -> dict:
        return {"data": self.data, "files": list(self.files), "chunks": self.chunks.shape[0],
                "seq_len": self.chunks.shape[1], "skip_tokens": SKIP_TOKENS}


def calibration_text(data: str, tokenizer, num_chunks: int, seq_len: int) -> CalibrationText:
    """The first windows of `seq_len` tokens of the text at `data`, read file by file until there are enough."""
    paths = resolve_paths(data)
    held_out = [p.name for p in paths if DEFAULT_HELD_OUT_PLAY in p.name.lower()]
    if held_out:
        raise InvalidRequestError(f"calibration text may not be the held-out evaluation play: {held_out}",
                                  param="calibration_data")
    needed, ids, used = SKIP_TOKENS + num_chunks * seq_len, [], []
    for path in paths:
        if len(ids) >= needed:
            break
        for doc in read_documents([path]):
            ids += tokenizer(doc, add_special_tokens=False)["input_ids"]
        used.append(path.name)
    if len(ids) < needed:
        raise InvalidRequestError(f"{data} has {len(ids)} tokens; {needed} needed for {num_chunks} calibration "
                                  f"windows of {seq_len}", param="calibration_data")
    chunks = torch.tensor(ids[SKIP_TOKENS:needed]).view(num_chunks, seq_len)  # [chunks, seq_len]
    return CalibrationText(data, chunks, tuple(used))
