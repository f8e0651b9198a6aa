"""Tiny end-to-end distillation runs: initial weights, loss goes down, exact resume after SIGKILL, bad input."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from services.errors import BoomerangError, TrainingConfigError
from services.family.plan import layout_from_rule
from services.family.student_init import init_student
from services.train.loop import TrainConfig, run_training
from services.train.losses import LossWeights
from tests.conftest import TINY_TEXT

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text(TINY_TEXT * 10)
    return path


def tiny_config(teacher: Path, corpus: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(teacher=str(teacher), data=str(corpus), out=str(out), max_steps=30, batch_size=2, seq_len=16,
                  lr=3e-3, warmup_steps=2, save_every=10, eval_every=0, progress=False, device="cpu")
    return TrainConfig(**{**values, **overrides})


def test_student_starts_as_the_teachers_kept_layers(llama_pair):
    teacher = AutoModelForCausalLM.from_pretrained(llama_pair[0]).eval()
    layout = layout_from_rule(teacher.config.num_hidden_layers)
    student = init_student(teacher, layout)
    assert student.config.num_hidden_layers == len(student.model.layers) == 5
    for s_index, t_index in enumerate(layout.copied_teacher_layers):
        for (name, s_param), (_, t_param) in zip(student.model.layers[s_index].named_parameters(),
                                                  teacher.model.layers[t_index].named_parameters()):
            torch.testing.assert_close(s_param, t_param, rtol=0, atol=0, msg=name)
        assert student.model.layers[s_index].self_attn.layer_idx == s_index
    assert teacher.model.layers[1].self_attn.layer_idx == 1  # the teacher is untouched


def test_thirty_steps_lower_the_loss_and_write_the_student(llama_pair, corpus, tmp_path):
    out = tmp_path / "run"
    run_training(tiny_config(llama_pair[0], corpus, out, lr=3e-4, weights=LossWeights(ce=0, kl=1, cos=20)))
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    first, last = sum(r["loss"] for r in records[:3]) / 3, sum(r["loss"] for r in records[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert {"kl", "cos", "lr", "tokens_per_s", "tokens", "grad_norm"} <= set(records[0])
    student_config = json.loads((out / "student_config.json").read_text())
    assert student_config["copied_teacher_layers"] == [0, 2, 4, 6, 7]
    entry = json.loads((out / "manifest_entry.json").read_text())
    assert entry["training"]["tokens"] == 30 * 2 * 16
    assert json.loads((out / "train_state.json").read_text())["finished"] is True
    summary = run_training(tiny_config(llama_pair[0], corpus, out, resume=True))
    assert summary["already_finished"] is True


def test_paper_defaults_log_every_term_and_switched_off_terms_are_absent(llama_pair, corpus, tmp_path):
    run_training(tiny_config(llama_pair[0], corpus, tmp_path / "a", max_steps=2))
    record = json.loads((tmp_path / "a" / "training_log.jsonl").read_text().splitlines()[0])
    assert {"ce", "kl", "cos"} <= set(record)
    run_training(tiny_config(llama_pair[0], corpus, tmp_path / "b", max_steps=2, weights=LossWeights(kl=0)))
    record = json.loads((tmp_path / "b" / "training_log.jsonl").read_text().splitlines()[0])
    assert "kl" not in record and {"ce", "cos"} <= set(record)


def _train_cmd(teacher, corpus, out, *extra):
    return [sys.executable, "-m", "services.train", "--teacher", str(teacher), "--data", str(corpus),
            "--out", str(out), "--max-steps", "400", "--batch-size", "2", "--seq-len", "16", "--lr", "3e-3",
            "--save-every", "10", "--eval-every", "0", "--device", "cpu", "--no-progress", *extra]


def test_sigkill_then_resume_ends_with_the_same_student(llama_pair, corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_train_cmd(llama_pair[0], corpus, reference), check=True, cwd=REPO, env=env,
                   capture_output=True)
    process = subprocess.Popen(_train_cmd(llama_pair[0], corpus, killed), cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((killed / "checkpoints").glob("step-00000[2-9]0")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "model.safetensors").exists(), "the run finished before it could be killed"
    subprocess.run(_train_cmd(llama_pair[0], corpus, killed, "--resume"), check=True, cwd=REPO, env=env,
                   capture_output=True)
    expected, actual = load_file(reference / "model.safetensors"), load_file(killed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    log_steps = [json.loads(line)["step"] for line in (killed / "training_log.jsonl").read_text().splitlines()]
    assert log_steps == list(range(1, 401))


def test_corrupted_latest_checkpoint_falls_back_to_previous(llama_pair, corpus, tmp_path):
    out = tmp_path / "run"
    run_training(tiny_config(llama_pair[0], corpus, out, max_steps=20))
    latest = out / "checkpoints" / "step-0000020" / "student.safetensors"
    latest.write_bytes(latest.read_bytes()[:-10] + b"0123456789")
    (out / "train_state.json").write_text(
        json.dumps({**json.loads((out / "train_state.json").read_text()), "finished": False}))
    (out / "model.safetensors").unlink()
    run_training(tiny_config(llama_pair[0], corpus, out, max_steps=20, resume=True))
    steps = [json.loads(line)["step"] for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 21))  # steps 11..20 were redone from the step-10 checkpoint


@pytest.mark.parametrize("extra, message", [
    (["--max-tokens", "8"], "smaller than one step"),
    (["--data", "/nonexistent/*.txt"], "no training text"),
])
def test_bad_input_is_one_line_and_exit_code_2(llama_pair, corpus, tmp_path, extra, message):
    cmd = _train_cmd(llama_pair[0], corpus, tmp_path / "out") + extra
    if "--max-tokens" in extra:
        cmd.remove("--max-steps")
        cmd.remove("400")
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_existing_output_needs_resume_or_overwrite(llama_pair, corpus, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("x")
    with pytest.raises(TrainingConfigError, match="--resume"):
        run_training(tiny_config(llama_pair[0], corpus, out))


def test_missing_teacher_is_refused(corpus, tmp_path):
    result = subprocess.run(_train_cmd(tmp_path / "nope", corpus, tmp_path / "out"), cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "model folder not found" in result.stderr


def _torchrun(teacher: Path, corpus: Path, out: Path, port: int, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
           "-m", "services.train", "--teacher", str(teacher), "--data", str(corpus), "--out", str(out),
           "--max-steps", "4", "--batch-size", "2", "--seq-len", "16", "--save-every", "2", "--eval-every", "0",
           "--device", "cpu", "--no-progress", *extra]
    result = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 0, _rank_errors(result.stderr)


def _rank_errors(stderr: str) -> str:
    """What the ranks said before torchrun's summary (whose tail alone hides the cause)."""
    markers = ("error", "exception", "terminate", "abort", "traceback", "raise", "failed")
    lines = [line for line in stderr.splitlines() if any(m in line.lower() for m in markers)]
    return "\n".join(lines[:60]) + "\n...\n" + stderr[-1500:]


def test_ddp_with_two_gloo_processes_trains_and_writes_one_student(llama_pair, corpus, tmp_path):
    out = tmp_path / "ddp"
    _torchrun(llama_pair[0], corpus, out, 29533)
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # written once, by rank 0
    assert records[-1]["tokens"] == 4 * 2 * 16 * 2  # both ranks' tokens counted
    assert json.loads((out / "manifest_entry.json").read_text())["training"]["world_size"] == 2
    fsdp = tmp_path / "fsdp"
    _torchrun(llama_pair[0], corpus, fsdp, 29534, "--fsdp")
    assert json.loads((fsdp / "manifest_entry.json").read_text())["training"]["strategy"] == "fsdp"
    sharded, replicated = load_file(fsdp / "model.safetensors"), load_file(out / "model.safetensors")
    assert sharded.keys() == replicated.keys()
    for name in sharded:  # the same data and seed: sharding changes where weights live, not what they become
        torch.testing.assert_close(sharded[name], replicated[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_resumes_from_a_gathered_checkpoint_exactly(llama_pair, corpus, tmp_path):
    out = tmp_path / "fsdp"
    _torchrun(llama_pair[0], corpus, out, 29535, "--fsdp")
    finished = load_file(out / "model.safetensors")
    shutil.rmtree(out / "checkpoints" / "step-0000004")  # as if the run had died after the step-2 checkpoint
    state = json.loads((out / "train_state.json").read_text())
    (out / "train_state.json").write_text(json.dumps({**state, "finished": False, "step": 2}))
    _torchrun(llama_pair[0], corpus, out, 29536, "--fsdp", "--resume")
    resumed = load_file(out / "model.safetensors")
    for name in finished:  # Adam moments and the schedule came back too, or steps 3-4 would differ
        torch.testing.assert_close(resumed[name], finished[name], rtol=0, atol=1e-6, msg=name)
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]


def test_init_student_continues_from_a_trained_student(llama_pair, corpus, tmp_path):
    config = tiny_config(llama_pair[0], corpus, tmp_path / "run", max_steps=1, lr=1e-12, warmup_steps=1,
                         init_student=str(llama_pair[1]))
    run_training(config)
    trained = load_file(tmp_path / "run" / "model.safetensors")
    start = load_file(llama_pair[1] / "model.safetensors")
    torch.testing.assert_close(trained["model.layers.0.mlp.up_proj.weight"],
                               start["model.layers.0.mlp.up_proj.weight"], rtol=0, atol=1e-9)


def test_a_checkpoint_killed_mid_write_leaves_the_previous_one_in_use(tmp_path):
    from services.train.checkpoint import load_latest, save_checkpoint

    model = torch.nn.Linear(4, 4)
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 10, model, {"tokens": 10})
    partial = root / "step-0000020.tmp"  # what SIGKILL during the next write leaves behind
    partial.mkdir()
    (partial / "student.safetensors").write_bytes(b"half a file")
    latest = load_latest(root)
    assert latest.step == 10 and latest.state["tokens"] == 10
    save_checkpoint(root, 20, model, {"tokens": 20})  # the next write replaces the leftover
    assert load_latest(root).step == 20 and not partial.exists()


def test_family_aware_term_distils_patched_variants_and_lowers_their_kl(llama_pair, corpus, tmp_path):
    out = tmp_path / "run"
    weights = LossWeights(ce=0, kl=1, cos=20, patch=1)
    run_training(tiny_config(llama_pair[0], corpus, out, lr=3e-4, weights=weights, patch_order="first"))
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    first, last = (sum(r["patch"] for r in part) / len(part) for part in (records[:5], records[-5:]))
    assert last < 0.8 * first, (first, last)
    recipe = json.loads((out / "manifest_entry.json").read_text())["training"]["recipe"]
    assert recipe["patch"] == 1 and recipe["patch_order"] == "first"


def test_family_aware_term_with_an_unknown_order_is_refused(llama_pair, corpus, tmp_path):
    weights = LossWeights(patch=1)
    with pytest.raises(BoomerangError, match="patch order"):
        run_training(tiny_config(llama_pair[0], corpus, tmp_path / "run", weights=weights, patch_order="sideways"))


def test_resume_of_a_run_saved_before_a_setting_existed_names_the_difference(llama_pair, corpus, tmp_path):
    out = tmp_path / "run"
    run_training(tiny_config(llama_pair[0], corpus, out, max_steps=2, save_every=1))
    state = json.loads((out / "train_state.json").read_text())
    del state["config"]["fsdp"]  # as written before --fsdp existed
    (out / "train_state.json").write_text(json.dumps({**state, "finished": False}))
    with pytest.raises(TrainingConfigError, match="different fsdp"):
        run_training(tiny_config(llama_pair[0], corpus, out, max_steps=2, resume=True, fsdp=True))


def test_an_explicit_layout_trains_a_student_of_that_size_and_resumes(llama_pair, corpus, tmp_path):
    """A student of one intermediate size (the paper's baseline for a patched size): the teacher layers it keeps
    are given, and a resumed run must keep them."""
    out, kept = tmp_path / "run", (0, 1, 2, 4, 6, 7)
    run_training(tiny_config(llama_pair[0], corpus, out, max_steps=4, save_every=2, copied_teacher_layers=kept))
    student = json.loads((out / "student_config.json").read_text())
    assert student == {"copied_teacher_layers": list(kept), "pruned_teacher_layers": [3, 5]}
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == len(kept)
    state = json.loads((out / "train_state.json").read_text())
    (out / "train_state.json").write_text(json.dumps({**state, "finished": False}))
    run_training(tiny_config(llama_pair[0], corpus, out, max_steps=4, save_every=2, resume=True,
                             copied_teacher_layers=kept))  # the saved layout (a JSON list) is the same run
    with pytest.raises(TrainingConfigError, match="different copied_teacher_layers"):
        run_training(tiny_config(llama_pair[0], corpus, out, max_steps=4, resume=True, copied_teacher_layers=(0, 4)))
    with pytest.raises(BoomerangError, match="must start at 0"):
        run_training(tiny_config(llama_pair[0], corpus, tmp_path / "bad", copied_teacher_layers=(1, 2)))
