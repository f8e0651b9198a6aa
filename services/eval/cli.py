"""`boomerang eval`: the interpolation curve as JSON, CSV and PNG; optionally recorded in the pair's manifest."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from services.cli_types import layer_counts
from services.engine.interface import DEFAULT_WEIGHTS, WEIGHT_FORMS
from services.errors import InvalidPairError, InvalidRequestError
from services.eval.baselines import needs_calibration, parse_baselines, prepare_baselines
from services.eval.baselines.calibration import calibration_text
from services.eval.chat import chat_quality, evaluate_chat, write_chat_report
from services.eval.curve import evaluate_curve, write_report
from services.eval.weights import compare_weights, write_weights_report
from services.family import load_family
from services.family.assembly import make_template
from services.family.loading import read_layout
from services.family.plan import Order, PatchOrder, patch_sequence
from services.store import DEFAULT_PAIR, update_manifest


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pair", help="models_store pair folder (default: the default pair)")
    parser.add_argument("--teacher", help="teacher folder (with --student)")
    parser.add_argument("--student", help="student folder (with --teacher)")
    parser.add_argument("--order", help="patch order (default: the pair's)")
    parser.add_argument("--out", default="runs/eval", help="folder for curve.json, curve.csv, curve.png")
    parser.add_argument("--chunks", type=int, default=8, help="windows per held-out text")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument(
        "--ablation",
        action="append",
        default=[],
        metavar="NAME=STUDENT_DIR",
        help="another student of the same teacher, plotted on the same axes (patched in the family's order "
        "where its layout has the same blocks, else last-to-first)",
    )
    parser.add_argument(
        "--baselines",
        default="naive",
        help="the teacher pruned without training at every size, comma-separated: naive (the "
        "student's layout, undistilled), shortgpt (lowest Block Influence dropped), laco "
        "(layers merged); see docs/baselines.md",
    )
    parser.add_argument(
        "--calibration-data",
        default="shakespeare",
        help="text that shortgpt and laco are calibrated on (never the held-out texts; default: "
        "the plays without The Tempest)",
    )
    parser.add_argument("--calibration-chunks", type=int, default=8, help="calibration windows")
    parser.add_argument("--calibration-seq-len", type=int, default=256)
    parser.add_argument(
        "--chat",
        action="store_true",
        help="also measure chat quality per size (answer perplexity, degenerate answers, agreement "
        "with the teacher, multiple choice): chat.json and chat.md",
    )
    parser.add_argument(
        "--chat-sizes",
        type=layer_counts,
        help="with --chat: only these layer counts (comma-separated; default: every size)",
    )
    parser.add_argument(
        "--chat-baselines",
        action="store_true",
        help="with --chat: the chat measures of each of --baselines too, at the same sizes (chat.json `baselines`)",
    )
    parser.add_argument("--no-curve", action="store_true", help="skip the raw-text curve (with --chat: chat only)")
    parser.add_argument(
        "--weights",
        choices=WEIGHT_FORMS,
        default=DEFAULT_WEIGHTS,
        help="int8 or q4: held-out perplexity of every size as loaded and in that form, and "
        "their ratio (weights-FORM.json; no curve); with --chat, the chat measures in that form (chat-FORM.json)",
    )
    parser.add_argument(
        "--update-manifest",
        action="store_true",
        help="record what was measured per size in the pair's manifest (`quality`)",
    )


def run(args: argparse.Namespace) -> int:
    baselines = parse_baselines(args.baselines)  # before loading: a misspelt name fails at once
    if args.chat_baselines and not args.chat:
        raise InvalidRequestError("--chat-baselines needs --chat", param="chat_baselines")
    if args.update_manifest and "naive" not in baselines:
        raise InvalidRequestError(
            "--update-manifest records the naive baseline: keep naive in --baselines", param="baselines"
        )
    if args.weights != "float":
        if args.update_manifest or args.ablation:
            raise InvalidRequestError(
                f"--weights {args.weights} measures a weight form, not the pair: drop --update-manifest and "
                "--ablation",
                param="weights",
            )
        return _chat_in_form(args) if args.chat else _compare_weights(args)
    family = load_family(args.teacher, args.student, pair=args.pair, order=args.order, device="cpu")
    calibration = (
        calibration_text(args.calibration_data, family.tokenizer, args.calibration_chunks, args.calibration_seq_len)
        if needs_calibration(baselines)
        else None
    )
    if args.chat:
        chat = _measure_chat(family, Path(args.out), "chat", args.chat_sizes)
        if args.chat_baselines:
            _measure_baselines_chat(family, chat, baselines, calibration, args)
        if args.update_manifest:
            _record_chat(Path(args.pair or DEFAULT_PAIR), chat)
    if args.no_curve:
        return 0
    options = dict(num_chunks=args.chunks, seq_len=args.seq_len, decode_tokens=args.decode_tokens)
    report = evaluate_curve(family, **options, baselines=baselines, calibration=calibration)
    ablations = {}
    for spec in args.ablation:
        name, _, student = spec.partition("=")
        teacher_dir = args.teacher or _teacher_dir(family)
        order = _ablation_order(student, family)
        ablations[name] = evaluate_curve(
            load_family(teacher_dir, student, order=order, device="cpu", name=name), **options, baselines=()
        )
    write_report(report, Path(args.out), ablations)
    if args.update_manifest:
        _record_quality(Path(args.pair or DEFAULT_PAIR), report)
    for row in report["sizes"]:
        ppl = {f"ppl_{k}": round(v, 2) for k, v in row["perplexity"].items()}
        pruned = {f"{name}_{k}": round(v, 2) for name, texts in row["baselines"].items() for k, v in texts.items()}
        print(
            json.dumps(
                {"num_layers": row["num_layers"], **ppl, **pruned, "tok_s": round(row["decode_tokens_per_s"], 2)}
            )
        )
    return 0


def _chat_in_form(args: argparse.Namespace) -> int:
    """The chat measures of every size with the weights in `--weights` form (chat-FORM.json, chat-FORM.md)."""
    family = load_family(args.teacher, args.student, pair=args.pair, order=args.order, device="cpu",
                         weights=args.weights)
    _measure_chat(family, Path(args.out), f"chat-{args.weights}", args.chat_sizes)
    return 0


def _measure_chat(family, out_dir: Path, name: str, sizes: tuple[int, ...] | None = None) -> dict:
    """Chat measures of every size (or `sizes`), written as NAME.json and NAME.md and printed a line a size."""
    unknown = sorted(set(sizes or ()) - set(family.sizes))
    if unknown:
        raise InvalidRequestError(f"--chat-sizes {unknown} are not sizes of this family "
                                  f"({min(family.sizes)}-{max(family.sizes)})", param="chat_sizes")
    chat = evaluate_chat(family, sizes=list(sizes) if sizes else None)
    write_chat_report(chat, out_dir, name=name)
    for row in chat["sizes"]:
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}))
    return chat


def _measure_baselines_chat(family, chat: dict, names: tuple[str, ...], calibration, args) -> None:
    """The chat measures of each baseline at the sizes measured for the family, added to chat.json/chat.md."""
    prepared = prepare_baselines(names, family, calibration)
    template = make_template(family.teacher, family.teacher)
    sizes = [row["num_layers"] for row in chat["sizes"]]
    chat["baselines"] = {}
    for name, baseline in prepared.items():
        rows = evaluate_chat(family, sizes=sizes, variant=lambda n, b=baseline: b.model(family, n, template))
        chat["baselines"][name] = rows["sizes"]
        for row in rows["sizes"]:
            print(json.dumps({"baseline": name, **{k: v for k, v in row.items() if k != "examples"}}))
    write_chat_report(chat, Path(args.out), name="chat")


def _compare_weights(args: argparse.Namespace) -> int:
    report = compare_weights(
        lambda weights: load_family(
            args.teacher, args.student, pair=args.pair, order=args.order, device="cpu", weights=weights
        ),
        args.weights,
        num_chunks=args.chunks,
        seq_len=args.seq_len,
    )
    print(f"wrote {write_weights_report(report, Path(args.out))}")
    for row in report["sizes"]:
        ratios = {f"ratio_{text}": round(value, 4) for text, value in row["ratio"].items()}
        print(
            json.dumps(
                {
                    "num_layers": row["num_layers"],
                    **ratios,
                    **{f"ppl_{args.weights}_{text}": round(value, 3) for text, value in row[args.weights].items()},
                }
            )
        )
    print(f"worst {args.weights} / float perplexity: {report['worst_ratio']:.4f}")
    print(f"all sizes' weights, {args.weights} / float bytes: {report['bytes_ratio']:.3f}")
    return 0



def _ablation_order(student: str, family) -> Order:
    """The family's patch order where it fits the other student's layout, else last-to-first (a student with
    another layout, such as every 4th layer, has other blocks)."""
    layout = read_layout(Path(student), family.layout.num_teacher_layers)
    try:
        patch_sequence(layout, family.order)
    except InvalidPairError:
        return PatchOrder.LAST_TO_FIRST
    return family.order


def _teacher_dir(family) -> str:
    return family.teacher.config._name_or_path


def _record_chat(pair_dir: Path, chat: dict) -> None:
    def change(manifest: dict) -> None:
        quality = manifest.setdefault("quality", {})
        for row in chat["sizes"]:
            quality.setdefault(str(row["num_layers"]), {})["chat"] = chat_quality(row)
        manifest["chat_quality_method"] = {
            k: chat[k] for k in ("prompts", "max_new_tokens", "multiple_choice", "sampling_defaults")
        }

    update_manifest(pair_dir, change)


def _record_quality(pair_dir: Path, report: dict) -> None:
    def change(manifest: dict) -> None:
        quality = manifest.setdefault("quality", {})
        for r in report["sizes"]:
            entry = quality.setdefault(str(r["num_layers"]), {})
            entry.update(
                {
                    "perplexity": {k: round(v, 3) for k, v in r["perplexity"].items()},
                    "decode_tokens_per_s_cpu": round(r["decode_tokens_per_s"], 2),
                }
            )
            if "naive" in r["baselines"]:  # other baselines stay in curve.json: the manifest describes the pair
                entry["naive_perplexity"] = {k: round(v, 3) for k, v in r["baselines"]["naive"].items()}
        manifest["quality_method"] = {
            k: report[k] for k in ("texts", "num_chunks", "seq_len", "device", "dtype", "machine")
        }

    update_manifest(pair_dir, change)
