"""`boomerang eval --weights`: perplexity of every size in a weight form against the float pair, and bytes."""

from __future__ import annotations

import pytest

from services.cli import main
from services.eval import weights as weights_eval
from services.family import load_family
from tests.conftest import TINY_TEXT, read_json


@pytest.mark.parametrize("form, max_bytes_ratio", [("int8", 0.30), ("q4", 0.20)])
def test_every_size_is_measured_in_both_forms_with_the_bytes_they_take(llama_pair, form, max_bytes_ratio,
                                                                       monkeypatch, tmp_path):
    monkeypatch.setattr(weights_eval, "HELD_OUT_TEXTS", {"tiny": lambda: TINY_TEXT * 8})
    report = weights_eval.compare_weights(
        lambda weights: load_family(*llama_pair, device="cpu", weights=weights), form, num_chunks=2, seq_len=32)
    float_family = load_family(*llama_pair, device="cpu")
    assert [row["num_layers"] for row in report["sizes"]] == float_family.sizes
    for row in report["sizes"]:
        assert row["ratio"]["tiny"] == row[form]["tiny"] / row["float"]["tiny"]
        assert 0.8 < row["ratio"]["tiny"] < 1.25  # a random tiny model: quantization moves it, not far
    assert report["weights_bytes"]["float"] == float_family.weights_bytes()
    assert 0.1 < report["bytes_ratio"] < max_bytes_ratio
    assert weights_eval.write_weights_report(report, tmp_path).name == f"weights-{form}.json"


def test_chat_measures_in_a_weight_form_and_a_form_never_updates_the_manifest(llama_pair, tmp_path):
    pair = ["--teacher", str(llama_pair[0]), "--student", str(llama_pair[1])]
    assert main(["eval", *pair, "--chat", "--weights", "q4", "--out", str(tmp_path)]) == 0
    report = read_json(tmp_path / "chat-q4.json")
    assert [row["num_layers"] for row in report["sizes"]] == load_family(*llama_pair, device="cpu").sizes
    assert all(row["answer_perplexity"] > 1 for row in report["sizes"])
    assert (tmp_path / "chat-q4.md").read_text().startswith("| layers |")
    assert main(["eval", *pair, "--weights", "int8", "--update-manifest"]) == 2


def test_chat_sizes_measures_only_those_sizes_and_refuses_sizes_the_family_lacks(llama_pair, tmp_path):
    pair = ["--teacher", str(llama_pair[0]), "--student", str(llama_pair[1])]
    assert main(["eval", *pair, "--chat", "--no-curve", "--chat-sizes", "5,7", "--out", str(tmp_path)]) == 0
    assert [row["num_layers"] for row in read_json(tmp_path / "chat.json")["sizes"]] == [5, 7]
    assert main(["eval", *pair, "--chat", "--no-curve", "--chat-sizes", "3", "--out", str(tmp_path)]) == 2


def test_chat_baselines_measures_each_pruned_teacher_at_the_family_s_sizes(llama_pair, tmp_path):
    pair = ["--teacher", str(llama_pair[0]), "--student", str(llama_pair[1])]
    args = ["eval", *pair, "--chat", "--no-curve", "--chat-sizes", "5", "--baselines", "naive,shortgpt",
            "--chat-baselines", "--calibration-chunks", "2", "--calibration-seq-len", "16", "--out", str(tmp_path)]
    assert main(args) == 0
    report = read_json(tmp_path / "chat.json")
    assert set(report["baselines"]) == {"naive", "shortgpt"}
    for rows in report["baselines"].values():
        assert [row["num_layers"] for row in rows] == [5] and rows[0]["answer_perplexity"] > 1
    assert report["baselines"]["naive"][0] != report["sizes"][0]  # the pruned teacher, not the family's size
    assert "### ShortGPT" in (tmp_path / "chat.md").read_text()
    assert main(["eval", *pair, "--chat-baselines"]) == 2
