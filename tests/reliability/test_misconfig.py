"""Misconfiguration is refused at start: exit code 2, one line naming the problem, no traceback."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _serve(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "services.cli", "serve", "--device", "cpu", "--port", "0", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def _copy(pair, tmp_path):
    teacher, student = tmp_path / "teacher", tmp_path / "student"
    shutil.copytree(pair[0], teacher)
    shutil.copytree(pair[1], student)
    return teacher, student


def _edit_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("breakage, message", [
    ("hidden_size", "differ in hidden_size"),
    ("student_config", "copies"),
    ("missing_weights", "no .safetensors weights"),
    ("pickle_only", "pickled"),
    ("tokenizer", "different vocabularies"),
])
def test_broken_pairs_exit_2_with_one_line(llama_pair, tmp_path, breakage, message):
    teacher, student = _copy(llama_pair, tmp_path)
    if breakage == "hidden_size":
        _edit_json(student / "config.json", hidden_size=32)
    elif breakage == "student_config":
        (student / "student_config.json").write_text(json.dumps({"copied_teacher_layers": [0, 2, 4]}))
    elif breakage == "missing_weights":
        (student / "model.safetensors").unlink()
    elif breakage == "pickle_only":
        (student / "model.safetensors").rename(student / "pytorch_model.bin")
    elif breakage == "tokenizer":
        tokenizer = json.loads((student / "tokenizer.json").read_text())
        vocab = tokenizer["model"]["vocab"]
        first = next(iter(vocab))
        vocab[first + "_renamed"] = vocab.pop(first)
        (student / "tokenizer.json").write_text(json.dumps(tokenizer))
    result = _serve("--teacher", str(teacher), "--student", str(student))
    assert result.returncode == 2, result.stderr[-1500:]
    errors = [line for line in result.stderr.splitlines() if message in line]
    assert errors, result.stderr[-1500:]
    assert "Traceback" not in result.stderr


def test_sha256_mismatch_in_a_store_pair_exits_2(llama_pair, tmp_path):
    from tests.services.store.test_store import make_store_pair

    pair_dir = make_store_pair(llama_pair, tmp_path, packed=False)
    weights = pair_dir / "teacher" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    result = _serve("--pair", str(pair_dir))
    assert result.returncode == 2
    assert any("does not match the manifest" in line for line in result.stderr.splitlines())
    assert "Traceback" not in result.stderr


def test_limits_that_would_exceed_the_machine_are_refused_at_start(llama_pair):
    result = _serve("--teacher", str(llama_pair[0]), "--student", str(llama_pair[1]), "--max-batch-size", "10000000")
    assert result.returncode == 2, result.stderr[-1500:]
    assert any("the limits need up to" in line and "GiB" in line for line in result.stderr.splitlines())
    assert "Traceback" not in result.stderr
