"""What a weight form costs in quality: held-out perplexity of every size with its weights as loaded and in
int8 or q4, on the same windows, and the ratio of the two (`boomerang eval --weights int8|q4`). Perplexity is
computed by the prefill path (weights dequantized, activations in float), as `/v1/score` computes it."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from services.eval.curve import perplexity
from services.eval.texts import HELD_OUT_TEXTS, eval_chunks
from services.family import Family


def compare_weights(load: Callable[[str], Family], form: str, num_chunks: int = 8, seq_len: int = 256) -> dict:
    """`load(weights)` gives the family as loaded ("float") and in `form`; each is measured, then let go."""
    per_form, weights_bytes, texts = {}, {}, None
    for weights in ("float", form):
        family = load(weights)
        weights_bytes[weights] = family.weights_bytes()
        texts = texts or {
            name: eval_chunks(read(), family.tokenizer, num_chunks, seq_len) for name, read in HELD_OUT_TEXTS.items()
        }
        per_form[weights] = {
            n: {name: perplexity(family.variant(n), chunks) for name, chunks in texts.items()} for n in family.sizes
        }
        del family
    rows = [
        {
            "num_layers": n,
            "float": per_form["float"][n],
            form: per_form[form][n],
            "ratio": {name: per_form[form][n][name] / per_form["float"][n][name] for name in texts},
        }
        for n in per_form["float"]
    ]
    return {
        "weights": form,
        "texts": list(texts),
        "num_chunks": num_chunks,
        "seq_len": seq_len,
        "machine": f"{platform.machine()} threads={torch.get_num_threads()}",
        "weights_bytes": weights_bytes,
        "bytes_ratio": weights_bytes[form] / weights_bytes["float"],
        "sizes": rows,
        "worst_ratio": max(r for row in rows for r in row["ratio"].values()),
    }


def write_weights_report(report: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"weights-{report['weights']}.json"
    path.write_text(json.dumps(report, indent=2))
    return path
