"""Held-out evaluation texts (`services.corpora`): a Shakespeare play never trained on, and out-of-domain
English prose (the Python documentation topics); cut into windows of tokens."""

from __future__ import annotations

from collections.abc import Callable

import torch

from services.corpora import held_out_play, python_docs

HELD_OUT_TEXTS: dict[str, Callable[[], str]] = {"shakespeare_tempest": held_out_play, "python_docs": python_docs}


def eval_chunks(text: str, tokenizer, num_chunks: int, seq_len: int, skip_tokens: int = 512) -> torch.Tensor:
    """The first `num_chunks` windows of `seq_len` tokens after skipping front matter: [chunks, seq_len]."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][skip_tokens:]
    needed = num_chunks * seq_len
    if len(ids) < needed:
        raise ValueError(f"text has {len(ids)} tokens after skipping; {needed} needed")
    return torch.tensor(ids[:needed]).view(num_chunks, seq_len)
