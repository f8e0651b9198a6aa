"""The interpolation curve: held-out perplexity of every size, boomerang vs the naively pruned teacher."""

from __future__ import annotations

import csv
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from services.eval.texts import HELD_OUT_TEXTS, eval_chunks
from services.family import Family
from services.family.plan import order_to_json
from services.family.student_init import init_student


@dataclass
class SizeResult:
    num_layers: int
    parameters: int
    perplexity: dict[str, float]
    naive_perplexity: dict[str, float]
    decode_tokens_per_s: float


@torch.inference_mode()
def perplexity(model: nn.Module, chunks: torch.Tensor, batch_size: int = 4) -> float:
    """exp(mean next-token negative log-likelihood) over every chunk."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in chunks.to(device).split(batch_size):  # [b, seq]
        logits = model(batch, use_cache=False).logits[:, :-1].float()  # [b, seq-1, vocab]
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total, count = total + float(nll), count + batch[:, 1:].numel()
    return math.exp(total / count)


@torch.inference_mode()
def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> float:
    """Greedy tokens per second with the KV cache, batch 1."""
    model.generate(prompt, max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0)
    return (out.shape[1] - prompt.shape[1]) / (time.perf_counter() - start)


def naive_family(family: Family) -> Family:
    """The same plans over a student that is only the teacher's kept layers, with no distillation."""
    student = init_student(family.teacher, family.layout)
    return Family(family.name + "-naive", family.teacher, student, family.layout, family.order, family.tokenizer)


def evaluate_curve(family: Family, num_chunks: int = 8, seq_len: int = 256, decode_tokens: int = 32,
                   progress: bool = True) -> dict:
    from tqdm import tqdm

    texts = {name: eval_chunks(load(), family.tokenizer, num_chunks, seq_len) for name, load in HELD_OUT_TEXTS.items()}
    naive = naive_family(family)
    prompt = next(iter(texts.values()))[:1, :16].to(family.device)  # [1, 16]
    results = []
    for n in tqdm(family.sizes, desc="sizes", disable=not progress):
        variant, pruned = family.variant(n), naive.variant(n)
        results.append(SizeResult(
            n, family.size_info(n).parameters,
            {name: perplexity(variant, chunks) for name, chunks in texts.items()},
            {name: perplexity(pruned, chunks) for name, chunks in texts.items()},
            decode_speed(variant, prompt, decode_tokens)))
    return {"family": family.name, "order": order_to_json(family.order), "num_chunks": num_chunks, "seq_len": seq_len,
            "texts": list(texts), "device": str(family.device), "dtype": str(family.dtype),
            "machine": f"{platform.machine()} {platform.processor() or ''} threads={torch.get_num_threads()}".strip(),
            "sizes": [asdict(r) for r in results]}


def write_report(report: dict, out_dir: Path, ablations: dict[str, dict] | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "curve.json").write_text(json.dumps({**report, "ablations": ablations or {}}, indent=2) + "\n")
    with open(out_dir / "curve.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        texts = report["texts"]
        writer.writerow(["num_layers", "parameters", *[f"ppl_{t}" for t in texts],
                         *[f"naive_ppl_{t}" for t in texts], "decode_tokens_per_s"])
        for row in report["sizes"]:
            writer.writerow([row["num_layers"], row["parameters"], *[f"{row['perplexity'][t]:.3f}" for t in texts],
                             *[f"{row['naive_perplexity'][t]:.3f}" for t in texts],
                             f"{row['decode_tokens_per_s']:.2f}"])
    (out_dir / "curve.md").write_text(markdown_table(report, ablations or {}))
    plot_curve(report, out_dir / "curve.png", ablations or {})


def markdown_table(report: dict, ablations: dict[str, dict]) -> str:
    """Per size: perplexity on each text with its change from the size below, naive pruning, ablations, speed."""
    texts = report["texts"]
    header = ["layers", "params (M)"]
    for text in texts:
        header += [f"ppl {text}", "Δ vs n-1", f"naive {text}"] + [f"{name} {text}" for name in ablations]
    header.append("greedy tok/s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    others = {name: {r["num_layers"]: r for r in other["sizes"]} for name, other in ablations.items()}
    previous = None
    for row in report["sizes"]:
        cells = [str(row["num_layers"]), f"{row['parameters'] / 1e6:.1f}"]
        for text in texts:
            ppl = row["perplexity"][text]
            change = f"{(ppl / previous['perplexity'][text] - 1) * 100:+.1f}%" if previous else ""
            cells += [f"{ppl:.1f}", change, f"{row['naive_perplexity'][text]:,.0f}"]
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

    texts = report["texts"]
    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.5))
    for ax, text in zip(axes if len(texts) > 1 else [axes], texts):
        layers = [r["num_layers"] for r in report["sizes"]]
        ax.plot(layers, [r["perplexity"][text] for r in report["sizes"]], "o-", label="boomerang (patched)")
        ax.plot(layers, [r["naive_perplexity"][text] for r in report["sizes"]], "s--", label="naively pruned teacher")
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
