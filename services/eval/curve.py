"""The interpolation curve: held-out perplexity of every size, boomerang vs the teacher pruned without training
(naively, ShortGPT, LaCo: `services.eval.baselines`)."""

from __future__ import annotations

import csv
import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from services.eval.baselines import LABELS, prepare_baselines
from services.eval.baselines.build import MergedLayers
from services.eval.baselines.calibration import CalibrationText
from services.eval.baselines.plans import Recipe
from services.eval.baselines.prefix import PrefixRunner
from services.eval.texts import HELD_OUT_TEXTS, eval_chunks
from services.family import Family
from services.family.assembly import make_template
from services.family.plan import order_to_json
from services.family.student_init import init_student


@dataclass
class SizeResult:
    num_layers: int
    parameters: int
    perplexity: dict[str, float]
    decode_tokens_per_s: float
    baselines: dict[str, dict[str, float]]  # baseline -> text -> perplexity

    def to_json(self) -> dict:
        """The row of curve.json; `naive_perplexity` is kept beside `baselines` for the readers of older files."""
        row = asdict(self)
        if "naive" in self.baselines:
            row["naive_perplexity"] = self.baselines["naive"]
        return row


def baseline_perplexities(row: dict) -> dict[str, dict[str, float]]:
    """A curve.json row's baselines, from files of either form (older ones have only `naive_perplexity`)."""
    if "baselines" in row:
        return row["baselines"]
    return {"naive": row["naive_perplexity"]} if "naive_perplexity" in row else {}


def _nll(output, batch: torch.Tensor) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of one batch ([b, seq]) and the tokens it covers."""
    logits = output.logits[:, :-1].float()  # [b, seq-1, vocab]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
    return float(nll), batch[:, 1:].numel()


def _exp_mean(parts: list[tuple[float, int]]) -> float:
    total, count = 0.0, 0
    for nll, tokens in parts:  # in batch order: the same sum whichever way the batches were run
        total, count = total + nll, count + tokens
    return math.exp(total / count)


@torch.inference_mode()
def perplexity(model: nn.Module, chunks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over every chunk."""
    device = next(model.parameters()).device
    return _exp_mean([_nll(model(batch, use_cache=False), batch) for batch in chunks.to(device).split(batch_size)])


class RecipePerplexity:
    """The perplexity of baseline recipes on every text, as `perplexity` measures it, memoised by recipe (every
    baseline is the teacher at its full size); each recipe runs from the deepest hidden state it shares with one
    measured before (`PrefixRunner`)."""

    def __init__(self, family: Family, texts: dict[str, torch.Tensor], template: nn.Module, batch_size: int = 4):
        merged = MergedLayers()  # neighbouring sizes share merged layers
        self.runners = {text: PrefixRunner(family, list(chunks.to(family.device).split(batch_size)), template,
                                           merged) for text, chunks in texts.items()}
        self.seen: dict[Recipe, dict[str, float]] = {}

    def __call__(self, recipe: Recipe) -> dict[str, float]:
        if recipe not in self.seen:
            self.seen[recipe] = {text: _exp_mean(runner.run(recipe, _nll)) for text, runner in self.runners.items()}
        return dict(self.seen[recipe])


@torch.inference_mode()
def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy tokens per second with the KV cache, batch 1."""
    model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start)


def naive_family(family: Family) -> Family:
    """The same plans over a student that is only the teacher's kept layers, with no distillation (a copy of the
    teacher: the `naive` baseline builds the same models from the teacher's own layers instead)."""
    student = init_student(family.teacher, family.layout)
    return Family(family.name + "-naive", family.teacher, student, family.layout, family.order, family.tokenizer)


def evaluate_curve(family: Family, num_chunks: int = 8, seq_len: int = 256, decode_tokens: int = 32,
                   progress: bool = True, baselines: Sequence[str] = ("naive",),
                   calibration: CalibrationText | None = None) -> dict:
    """Every size of the family and of each baseline (the teacher pruned without training), on the same windows."""
    from tqdm import tqdm

    texts = {name: eval_chunks(load(), family.tokenizer, num_chunks, seq_len) for name, load in HELD_OUT_TEXTS.items()}
    prepared = prepare_baselines(baselines, family, calibration)
    measure = RecipePerplexity(family, texts, make_template(family.teacher, family.teacher))
    prompt = next(iter(texts.values()))[:1, :16].to(family.device)  # [1, 16]
    results = []
    for n in tqdm(family.sizes, desc="sizes", disable=not progress):
        variant = family.variant(n)
        scores = {name: measure(baseline.recipes[n]) for name, baseline in prepared.items()}
        results.append(SizeResult(
            n, family.size_info(n).parameters,
            {name: perplexity(variant, chunks) for name, chunks in texts.items()},
            decode_speed(variant, prompt, decode_tokens), scores))
    report = {"family": family.name, "order": order_to_json(family.order), "num_chunks": num_chunks,
              "seq_len": seq_len, "texts": list(texts), "device": str(family.device), "dtype": str(family.dtype),
              "machine": f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip(),
              "sizes": [r.to_json() for r in results],
              "baselines": {name: baseline.describe() for name, baseline in prepared.items()}}
    if calibration is not None:
        report["calibration"] = calibration.describe()
    return report


def baseline_names(report: dict) -> list[str]:
    return list(baseline_perplexities(report["sizes"][0])) if report["sizes"] else []


def write_report(report: dict, out_dir: Path, ablations: dict[str, dict] | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "curve.json").write_text(json.dumps({**report, "ablations": ablations or {}}, indent=2) + "\n")
    texts, names = report["texts"], baseline_names(report)
    with open(out_dir / "curve.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["num_layers", "parameters", *[f"ppl_{t}" for t in texts],
                         *[f"{name}_ppl_{t}" for name in names for t in texts], "decode_tokens_per_s"])
        for row in report["sizes"]:
            pruned = baseline_perplexities(row)
            writer.writerow([row["num_layers"], row["parameters"], *[f"{row['perplexity'][t]:.3f}" for t in texts],
                             *[f"{pruned[name][t]:.3f}" for name in names for t in texts],
                             f"{row['decode_tokens_per_s']:.2f}"])
    (out_dir / "curve.md").write_text(markdown_table(report, ablations or {}))
    plot_curve(report, out_dir / "curve.png", ablations or {})


def _ppl(value: float) -> str:
    return f"{value:,.0f}" if value >= 1000 else f"{value:.1f}"


def markdown_table(report: dict, ablations: dict[str, dict]) -> str:
    """Per size: perplexity on each text with its change from the size below, each baseline, ablations, speed."""
    texts, names = report["texts"], baseline_names(report)
    header = ["layers", "params (M)"]
    for text in texts:
        header += [f"ppl {text}", "Δ vs n-1"] + [f"{name} {text}" for name in [*names, *ablations]]
    header.append("greedy tok/s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    others = {name: {r["num_layers"]: r for r in other["sizes"]} for name, other in ablations.items()}
    previous = None
    for row in report["sizes"]:
        cells = [str(row["num_layers"]), f"{row['parameters'] / 1e6:.1f}"]
        pruned = baseline_perplexities(row)
        for text in texts:
            ppl = row["perplexity"][text]
            change = f"{(ppl / previous['perplexity'][text] - 1) * 100:+.1f}%" if previous else ""
            cells += [f"{ppl:.1f}", change] + [_ppl(pruned[name][text]) for name in names]
            cells += [f"{others[name][row['num_layers']]['perplexity'][text]:.1f}"
                      if row["num_layers"] in others[name] else "" for name in ablations]
        cells.append(f"{row['decode_tokens_per_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
        previous = row
    return "\n".join(lines) + "\n"


def plot_curve(report: dict, path: Path, ablations: dict[str, dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts, names = report["texts"], baseline_names(report)
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.5))
    for ax, text in zip(axes if len(texts) > 1 else [axes], texts):
        layers = [r["num_layers"] for r in report["sizes"]]
        ax.plot(layers, [r["perplexity"][text] for r in report["sizes"]], "o-", label="boomerang (patched)")
        for name, marker in zip(names, ("s--", "D--", "v--", "x--")):
            ax.plot(layers, [baseline_perplexities(r)[name][text] for r in report["sizes"]], marker,
                    label=LABELS.get(name, name))
        for name, other in ablations.items():
            ax.plot([r["num_layers"] for r in other["sizes"]], [r["perplexity"][text] for r in other["sizes"]],
                    "^:", label=name)
        ax.annotate("student", (layers[0], report["sizes"][0]["perplexity"][text]))
        ax.annotate("teacher", (layers[-1], report["sizes"][-1]["perplexity"][text]))
        ax.set_yscale("log")
        ax.set_xlabel("decoder layers")
        ax.set_ylabel("perplexity (log scale)")
        ax.set_title(f"{report['family']} — {text}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
