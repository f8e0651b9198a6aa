"""The greedy patch-order search on a tiny pair: a valid order, each step the cheapest, and what it records."""

import json
import subprocess
import sys
from pathlib import Path

from services.eval.calibrate import calibrate_order
from services.eval.curve import perplexity
from services.eval.texts import HELD_OUT_TEXTS, eval_chunks
from services.family import load_family
from services.family.plan import patch_sequence
from tests.conftest import TINY_TEXT

REPO = Path(__file__).resolve().parents[3]


def test_each_step_patches_the_cheapest_block_and_the_order_serves(llama_pair):
    family = load_family(*llama_pair, device="cpu")
    chunks = eval_chunks(HELD_OUT_TEXTS["python_docs"](), family.tokenizer, 2, 32)
    steps = calibrate_order(family, chunks, progress=False)
    order = [step.patched_block for step in steps]
    assert sorted(order) == sorted(patch_sequence(family.layout, "first"))
    assert [len(step.candidates) for step in steps] == list(range(len(order), 0, -1))
    for step in steps:
        assert step.perplexity == min(step.candidates.values()) == step.candidates[step.patched_block]
    served = load_family(*llama_pair, order=order, device="cpu")
    for step in steps[:-1]:  # the last step leaves single-layer blocks to the student; the family serves the teacher
        assert abs(perplexity(served.variant(step.num_layers), chunks) - step.perplexity) < 1e-9 * step.perplexity


def test_cli_writes_the_search_and_refuses_text_too_short(llama_pair, tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text(TINY_TEXT * 400)
    base = [sys.executable, "-m", "services.cli", "calibrate", "--teacher", str(llama_pair[0]), "--student",
            str(llama_pair[1]), "--seq-len", "32", "--chunks", "2", "--out", str(tmp_path / "out")]
    result = subprocess.run(base + ["--data", str(corpus)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert json.loads(result.stdout.splitlines()[-1])["order"] == report["order"]
    assert report["chunks"] == 2 and len(report["steps"]) == len(report["order"])
    (tmp_path / "short.txt").write_text("too short")
    result = subprocess.run(base + ["--data", str(tmp_path / "short.txt")], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error:"), result.stderr[-500:]


def test_unseen_text_lends_all_its_rows(llama_pair, tmp_path):
    """Text too short to hold out rows of its own still calibrates when it was never trained on."""
    corpus = tmp_path / "fresh.txt"
    corpus.write_text(TINY_TEXT)  # a handful of rows of 33 tokens: 2% of them is none
    base = [sys.executable, "-m", "services.cli", "calibrate", "--teacher", str(llama_pair[0]), "--student",
            str(llama_pair[1]), "--seq-len", "32", "--chunks", "3", "--out", str(tmp_path / "out"), "--data",
            str(corpus)]
    refused = subprocess.run(base, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2, refused.stderr[-500:]
    result = subprocess.run(base + ["--unseen"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "calibration.json").read_text())
    assert report["unseen"] is True and report["chunks"] == 3
