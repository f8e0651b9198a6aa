"""`boomerang calibrate`: search a patch order on calibration text and record it in the pair's manifest."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from services.corpora import build_data
from services.errors import InvalidRequestError
from services.eval.calibrate import calibrate_order
from services.family import load_family
from services.store import DEFAULT_PAIR, update_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pair", help="models_store pair folder (default: the default pair)")
    parser.add_argument("--teacher", help="teacher folder (with --student)")
    parser.add_argument("--student", help="student folder (with --teacher)")
    parser.add_argument("--data", default="shakespeare",
                        help="calibration text: the validation rows of this training corpus (never its train rows)")
    parser.add_argument("--unseen", action="store_true",
                        help="the text was never trained on (e.g. fresh `boomerang synth` samples): any of its rows")
    parser.add_argument("--chunks", type=int, default=16, help="rows of calibration text (the trainer holds out 16)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="the corpus split seed (the trainer's --seed)")
    parser.add_argument("--out", default="runs/calibrate", help="folder for calibration.json")
    parser.add_argument("--update-manifest", action="store_true", help="make the found order the pair's order")


def run(args: argparse.Namespace) -> int:
    family = load_family(args.teacher, args.student, pair=args.pair, order="last", device="cpu")
    data = build_data(args.data, family.tokenizer, args.seq_len, args.seed)
    rows = torch.cat([data.valid, data.train]) if args.unseen else data.valid  # [rows, seq_len+1]
    chunks = rows[: args.chunks, : args.seq_len]  # [chunks, seq_len]
    if len(chunks) == 0:
        raise InvalidRequestError(f"{args.data} is too short to hold out calibration rows of {args.seq_len} tokens")
    steps = calibrate_order(family, chunks)
    order = [step.patched_block for step in steps]
    report = {"order": order, "data": args.data, "unseen": args.unseen, "chunks": len(chunks),
              "seq_len": args.seq_len, "seed": args.seed, "steps": [asdict(step) for step in steps]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.update_manifest:
        calibration = {k: report[k] for k in ("data", "unseen", "chunks", "seq_len", "seed")}
        update_manifest(Path(args.pair or DEFAULT_PAIR),
                        lambda manifest: manifest.update(order=order, order_calibration=calibration))
    for step in steps:
        print(json.dumps({"num_layers": step.num_layers, "patched_block": step.patched_block,
                          "perplexity": round(step.perplexity, 3)}))
    print(json.dumps({"order": order}))
    return 0
