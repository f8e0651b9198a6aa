"""The `boomerang` console script: one subcommand per job."""

from __future__ import annotations

import argparse
import logging
import sys

from services.errors import BoomerangError


def _import_teacher(args: argparse.Namespace) -> int:
    """Convert the teacher once (and unpack the pair's student, when it ships one) into the cache; build kernels."""
    from services.store import DEFAULT_PAIR, Manifest, resolve_student, resolve_teacher

    manifest = Manifest.read(args.pair or DEFAULT_PAIR)
    teacher = resolve_teacher(manifest)
    print(f"teacher: {teacher}")
    if manifest.student.get("sha256"):
        print(f"student: {resolve_student(manifest, teacher)}")
    from services.cpu.kernels.decoder_step import load_decoder_step
    from services.cpu.kernels.gemv import load_gemv

    print(f"native GEMV kernel: {'built' if load_gemv() is not None else 'unavailable (torch matmul serves)'}")
    built = load_decoder_step() is not None
    print(f"native decoder-step kernel: {'built' if built else 'unavailable (the decoder layers forward serves)'}")
    return 0


def _pack(args: argparse.Namespace) -> int:
    """Ship a trained student into a pair: int8 packed, sharing the teacher's tensors, sha256 in the manifest."""
    import json
    import shutil
    from pathlib import Path

    from services.store import DEFAULT_PAIR, Manifest, resolve_teacher, update_manifest
    from services.store.integrity import hash_weights
    from services.store.student_pack import pack_student

    pair_dir = Path(args.pair or DEFAULT_PAIR)
    manifest = Manifest.read(pair_dir)
    student_dir, out_dir = Path(args.student), pair_dir / "student"
    shutil.rmtree(out_dir, ignore_errors=True)
    info = pack_student(student_dir, resolve_teacher(manifest), out_dir)
    for name in ("training_log.jsonl", "manifest_entry.json"):
        if (student_dir / name).exists():
            shutil.copy(student_dir / name, out_dir / name)
    entry = {"path": "student", "format": info["format"], "sha256": hash_weights(out_dir),
             "shared_with_teacher": info["shared_with_teacher"]}
    update_manifest(pair_dir, lambda manifest: manifest.update(student=entry))
    print(json.dumps({"packed_bytes": sum(p.stat().st_size for p in out_dir.iterdir()), **entry}))
    return 0


def _train(args: argparse.Namespace) -> int:
    from services.train.cli import run

    return run(args)


def _add_train(sub) -> None:
    from services.train.cli import add_arguments

    parser = sub.add_parser("train", help="distil a boomerang student from a teacher")
    add_arguments(parser)
    parser.set_defaults(handler=_train)


def _add_synth(sub) -> None:
    from services.train.cli import add_synth_arguments, run_synth

    parser = sub.add_parser("synth", help="sample the teacher into JSONL training text (its own distribution)")
    add_synth_arguments(parser)
    parser.set_defaults(handler=run_synth)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("boomerang")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="boomerang", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    teacher = sub.add_parser("import-teacher", help="convert the pair's teacher once and cache it (and its student)")
    teacher.add_argument("--pair", help="models_store pair folder (default: the default pair)")
    teacher.set_defaults(handler=_import_teacher)
    _add_train(sub)
    _add_synth(sub)
    pack = sub.add_parser("pack", help="ship a trained student into a models_store pair (int8, shared tensors)")
    pack.add_argument("--student", required=True, help="the output folder of `boomerang train`")
    pack.add_argument("--pair", help="models_store pair folder (default: the default pair)")
    pack.set_defaults(handler=_pack)
    for name, register in _EXTRA_COMMANDS.items():
        try:
            register(sub)
        except ModuleNotFoundError as error:  # e.g. a training-only image without the serving stack
            _add_unavailable(sub, name, error)
    return parser


def _add_unavailable(sub, name: str, error: ModuleNotFoundError) -> None:
    """A subcommand whose dependencies are missing: it answers with one line instead of breaking the rest."""
    parser = sub.add_parser(name, help=f"unavailable here: needs {error.name}")
    parser.set_defaults(takes_any_arguments=True)

    def unavailable(_args: argparse.Namespace) -> int:
        print(f"error: `boomerang {name}` needs the package {error.name!r}, which is not installed "
              "(`make install` installs everything)", file=sys.stderr)
        return 2
    parser.set_defaults(handler=unavailable)


def _add_serve(sub) -> None:
    from app.cli import add_arguments, run

    parser = sub.add_parser("serve", help="serve a family over the OpenAI-compatible HTTP API")
    add_arguments(parser)
    parser.set_defaults(handler=run)


def _add_eval(sub) -> None:
    from services.eval.cli import add_arguments, run

    parser = sub.add_parser("eval", help="measure the interpolation curve of a family")
    add_arguments(parser)
    parser.set_defaults(handler=run)


def _add_calibrate(sub) -> None:
    from services.eval.calibrate_cli import add_arguments, run

    parser = sub.add_parser("calibrate", help="search the patch order that costs least per size (greedy)")
    add_arguments(parser)
    parser.set_defaults(handler=run)


def _add_bench(sub) -> None:
    from services.bench.cli import add_arguments, run

    parser = sub.add_parser("bench", help="measure memory, switching cost and speed of a family")
    add_arguments(parser)
    parser.set_defaults(handler=run)


# commands with dependencies of their own (the serving stack, matplotlib): registered when importable
_EXTRA_COMMANDS = {"serve": _add_serve, "eval": _add_eval, "calibrate": _add_calibrate, "bench": _add_bench}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "takes_any_arguments", False):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except BoomerangError as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
