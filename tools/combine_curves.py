"""Several `boomerang eval` curves on one set of axes, without measuring again: the first report is the family,
the others are drawn beside it as ablations (curve.json, curve.md and curve.png, as `boomerang eval --ablation`
writes them). For students whose curves were measured one by one, each with its own patch order.

    python tools/combine_curves.py --out runs/claims/all runs/claims/eval-every2/curve.json \
        "random init=runs/claims/eval-random/curve.json" ...
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from services.eval.curve import write_report  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", help="the family's curve.json")
    parser.add_argument("others", nargs="+", metavar="NAME=CURVE_JSON", help="curves drawn beside it")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    report = json.loads(Path(args.family).read_text())
    ablations = {}
    for spec in args.others:
        name, _, path = spec.partition("=")
        other = json.loads(Path(path).read_text())
        ablations[name] = {key: value for key, value in other.items() if key != "ablations"}
    report.pop("ablations", None)
    write_report(report, Path(args.out), ablations)
    print(f"wrote {args.out}/curve.json, curve.md, curve.png")


if __name__ == "__main__":
    main()
