"""`boomerang train` / `python -m services.train`: argument parsing and one-line errors (exit code 2)."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from services.cli_types import layer_counts
from services.errors import BoomerangError, TrainingConfigError
from services.train.loop import TrainConfig, run_training
from services.train.losses import LossWeights
from services.train.synth import SynthConfig, synthesize

DEFAULT_TEACHER = "default"
_DEFAULTS = TrainConfig(teacher="", data="", out="")
_WEIGHTS = LossWeights()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--teacher", default=DEFAULT_TEACHER,
                        help="HF teacher folder, or 'default' for the default pair's teacher")
    parser.add_argument("--data", default="shakespeare",
                        help="text/JSONL files, folders or globs (comma-separated), or 'shakespeare'")
    parser.add_argument("--out", required=True, help="output folder: becomes the student")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--max-minutes", type=float,
                        help="wall-clock budget: the step count is fitted to it from the first steps' time "
                             "(with --max-steps/--max-tokens: whichever ends first)")
    for name in ("save_every", "eval_every", "seed", "batch_size", "seq_len", "grad_accum", "warmup_steps",
                 "first", "every", "last"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(_DEFAULTS, name))
    parser.add_argument("--copied-teacher-layers", type=layer_counts,
                        help="the teacher layers the student keeps (comma-separated, from 0), instead of "
                             "--first/--every/--last: e.g. a student of one intermediate size")
    for name in ("lr", "weight_decay", "clip"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(_DEFAULTS, name))
    parser.add_argument("--w-ce", type=float, default=_WEIGHTS.ce, help="cross-entropy weight (0 = off)")
    parser.add_argument("--w-kl", type=float, default=_WEIGHTS.kl, help="KL-to-teacher weight (0 = off)")
    parser.add_argument("--w-cos", type=float, default=_WEIGHTS.cos,
                        help="cosine alignment weight, split across aligned states (0 = off)")
    parser.add_argument("--temperature", type=float, default=_WEIGHTS.temperature)
    parser.add_argument("--w-mse", type=float, default=_WEIGHTS.mse,
                        help="relative squared-error alignment of the same hidden states (aligns norms too; 0 = off)")
    parser.add_argument("--w-patch", type=float, default=_WEIGHTS.patch,
                        help="KL to the teacher of one patched variant per micro-step (family-aware; 0 = off)")
    parser.add_argument("--patch-order", default="last",
                        help="the order --w-patch draws variants from: last, first or a calibrated 2,5,3,...")
    parser.add_argument("--init-student", help="continue from this trained student's weights (same layout)")
    parser.add_argument("--random-init", action="store_true", help="random student weights (the paper's ablation)")
    parser.add_argument("--freeze-embeddings", action="store_true",
                        help="keep the teacher's embeddings (the student can then share them on disk)")
    parser.add_argument("--fsdp", action="store_true",
                        help="under torchrun: shard student and teacher across ranks (FSDP2) instead of DDP")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--device")
    parser.add_argument("--no-progress", action="store_true")


def teacher_folder(teacher: str) -> str:
    """The teacher folder an argument names ('default': the default pair's, imported once)."""
    if teacher != DEFAULT_TEACHER:
        return teacher
    from services.store import DEFAULT_PAIR, Manifest, resolve_teacher

    return str(resolve_teacher(Manifest.read(DEFAULT_PAIR)))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    teacher = teacher_folder(args.teacher)
    names = ("max_steps", "max_tokens", "max_minutes", "save_every", "eval_every", "seed", "batch_size", "seq_len",
             "grad_accum", "warmup_steps", "first", "every", "last", "lr", "weight_decay", "clip", "random_init",
             "freeze_embeddings", "patch_order", "fsdp", "resume", "overwrite", "device", "init_student",
             "copied_teacher_layers")
    weights = LossWeights(ce=args.w_ce, kl=args.w_kl, cos=args.w_cos, temperature=args.temperature,
                          mse=args.w_mse, patch=args.w_patch)
    return TrainConfig(teacher=teacher, data=args.data, out=args.out, weights=weights,
                       progress=not args.no_progress, **{n: getattr(args, n) for n in names})



def add_synth_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SynthConfig(teacher="", out="", tokens=0)
    parser.add_argument("--teacher", default=DEFAULT_TEACHER,
                        help="HF teacher folder, or 'default' for the default pair's teacher")
    parser.add_argument("--out", required=True, help="the JSONL file to write (a training --data source)")
    parser.add_argument("--tokens", type=int, required=True, help="stop once this many tokens are written")
    for name in ("batch_size", "max_new_tokens", "seed"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--max-minutes", type=float, help="or stop after the round that passes this budget")
    parser.add_argument("--device")
    parser.add_argument("--resume", action="store_true", help="continue an existing file with the next round")
    parser.add_argument("--chat", action="store_true",
                        help="conversations in the teacher's chat template (it writes the user turns too) instead "
                             "of samples from its start token; --max-new-tokens bounds each answer")
    parser.add_argument("--answer-num-layers", type=layer_counts, default=(),
                        help="with --chat: answers written by these sizes of --pair's family (comma-separated, "
                             "e.g. 16,18,20), the teacher still writing the user turns: the student's own "
                             "answers, for the trainer to correct towards the teacher's (on-policy distillation)")
    parser.add_argument("--pair", help="the models_store pair whose sizes answer (default: the default pair)")


def run_synth(args: argparse.Namespace) -> int:
    """`boomerang synth` (its errors become one line and exit code 2 in `services.cli.main`)."""
    from services.train.chat_synth import synthesize_chats

    config = SynthConfig(teacher=teacher_folder(args.teacher), out=args.out, tokens=args.tokens,
                         batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, seed=args.seed, max_minutes=args.max_minutes,
                         device=args.device, resume=args.resume, answer_num_layers=args.answer_num_layers,
                         pair=args.pair)
    if config.answer_num_layers and not args.chat:
        raise TrainingConfigError("--answer-num-layers needs --chat")
    print(json.dumps((synthesize_chats if args.chat else synthesize)(config)))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        summary = run_training(config_from_args(args))
    except BoomerangError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    print(json.dumps(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    parser = argparse.ArgumentParser(prog="boomerang train", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
