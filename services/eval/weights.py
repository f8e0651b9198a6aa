"""What a weight form costs in quality: held-out perplexity of every size with its weights as loaded and in
int8, on the same windows, and the ratio of the two (`boomerang eval --weights int8`)."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from services.eval.curve import perplexity
from services.eval.texts import HELD_OUT_TEXTS, eval_chunks
from services.family import Family


def compare_weights(load: Callable[[bool], Family], num_chunks: int = 8, seq_len: int = 256) -> dict:
    """`load(int8)` gives the family in either form; each form is measured, then let go, in turn."""
    per_form, texts = {}, None
    for int8 in (False, True):
        family = load(int8)
        texts = texts or {name: eval_chunks(read(), family.tokenizer, num_chunks, seq_len)
                          for name, read in HELD_OUT_TEXTS.items()}
        per_form[int8] = {n: {name: perplexity(family.variant(n), chunks) for name, chunks in texts.items()}
                          for n in family.sizes}
        del family
    rows = [{"num_layers": n, "float": per_form[False][n], "int8": per_form[True][n],
             "ratio": {name: per_form[True][n][name] / per_form[False][n][name] for name in texts}}
            for n in per_form[False]]
    return {"texts": list(texts), "num_chunks": num_chunks, "seq_len": seq_len,
            "machine": f"{platform.machine()} threads={torch.get_num_threads()}", "sizes": rows,
            "worst_ratio": max(r for row in rows for r in row["ratio"].values())}


def write_weights_report(report: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "weights.json"
    path.write_text(json.dumps(report, indent=2))
    return path
