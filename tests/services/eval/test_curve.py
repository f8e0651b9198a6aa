"""The curve on a tiny pair: endpoints are exactly teacher and student, runs are deterministic, files written."""

import json

import torch
from transformers import AutoModelForCausalLM

from services.eval.curve import evaluate_curve, perplexity, write_report
from services.eval.texts import HELD_OUT_TEXTS, eval_chunks
from services.family import load_family


def test_curve_endpoints_determinism_and_report(llama_pair, tmp_path):
    family = load_family(*llama_pair, device="cpu", name="tiny")
    options = dict(num_chunks=2, seq_len=32, decode_tokens=4, progress=False)
    report = evaluate_curve(family, **options)
    again = evaluate_curve(family, **options)
    assert [r["perplexity"] for r in report["sizes"]] == [r["perplexity"] for r in again["sizes"]]
    assert [r["num_layers"] for r in report["sizes"]] == family.sizes

    chunks = eval_chunks(HELD_OUT_TEXTS["python_docs"](), family.tokenizer, 2, 32)
    for folder, row in ((llama_pair[0], report["sizes"][-1]), (llama_pair[1], report["sizes"][0])):
        standalone = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        assert abs(perplexity(standalone, chunks) - row["perplexity"]["python_docs"]) < 1e-6 * row["perplexity"][
            "python_docs"]
    teacher_row = report["sizes"][-1]
    assert teacher_row["perplexity"] == teacher_row["naive_perplexity"]  # the full size is the teacher either way

    write_report(report, tmp_path, {"ablation": again})
    saved = json.loads((tmp_path / "curve.json").read_text())
    assert saved["sizes"] == report["sizes"] and "ablation" in saved["ablations"]
    assert (tmp_path / "curve.csv").read_text().count("\n") == len(family.sizes) + 1
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "curve.md").read_text().splitlines()
    assert len(table) == len(family.sizes) + 2 and "ablation python_docs" in table[0]


def test_an_ablation_with_another_layout_is_patched_last_to_first(llama_pair, tmp_path):
    """A student keeping every 4th layer has other blocks than the family's order names: it is measured with
    last-to-first patching, over its own sizes, on the same axes."""
    from services.cli import main
    from services.family.plan import layout_from_rule
    from services.family.student_init import init_student, save_student

    teacher = AutoModelForCausalLM.from_pretrained(llama_pair[0])
    layout = layout_from_rule(teacher.config.num_hidden_layers, every=4)
    save_student(init_student(teacher, layout), layout, tmp_path / "every4")
    out = tmp_path / "eval"
    args = ["eval", "--teacher", str(llama_pair[0]), "--student", str(llama_pair[1]), "--order", "2,0,1", "--chunks",
            "1", "--seq-len", "16", "--decode-tokens", "2", "--ablation", f"every 4th={tmp_path / 'every4'}",
            "--ablation", f"same={llama_pair[1]}", "--out", str(out)]
    assert main(args) == 0
    ablations = json.loads((out / "curve.json").read_text())["ablations"]
    assert ablations["every 4th"]["order"] == "last" and ablations["same"]["order"] == [2, 0, 1]
    sizes = [row["num_layers"] for row in ablations["every 4th"]["sizes"]]
    assert sizes == [4, 5, 8]  # blocks of 4 and 2 teacher layers: a patch adds 3 layers or 1
