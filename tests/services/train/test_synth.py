"""`boomerang synth`: teacher samples written round by round as JSONL; a resumed run writes the same file."""

import json

import pytest

from services.corpora import read_documents, resolve_paths, shakespeare_files
from services.errors import TrainingConfigError
from services.train.synth import MIN_SAMPLE_TOKENS, SynthConfig, synthesize


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _config(teacher, out, **overrides) -> SynthConfig:
    values = dict(teacher=str(teacher), out=str(out), tokens=300, batch_size=4, max_new_tokens=24, device="cpu")
    return SynthConfig(**{**values, **overrides})


def test_samples_reach_the_token_budget_and_are_training_text(llama_pair, tmp_path):
    out = tmp_path / "synth.jsonl"
    summary = synthesize(_config(llama_pair[0], out))
    records = _records(out)
    assert summary["tokens"] == sum(r["tokens"] for r in records) >= 300
    assert all(MIN_SAMPLE_TOKENS <= r["tokens"] <= 24 and r["text"] for r in records)
    assert read_documents([out]) == [r["text"] for r in records if r["text"].strip()]


def test_a_resumed_run_writes_what_one_run_writes(llama_pair, tmp_path):
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    synthesize(_config(llama_pair[0], whole))
    synthesize(_config(llama_pair[0], parts, tokens=100))
    with pytest.raises(TrainingConfigError, match="--resume"):
        synthesize(_config(llama_pair[0], parts))
    synthesize(_config(llama_pair[0], parts, resume=True))
    assert parts.read_text() == whole.read_text()


def test_shakespeare_mixes_with_other_sources_and_keeps_the_tempest_out(tmp_path):
    extra = tmp_path / "extra.jsonl"
    extra.write_text(json.dumps({"text": "hello"}) + "\n")
    paths = resolve_paths(f"shakespeare,{extra}")
    assert paths == shakespeare_files() + [extra]
    assert not any("tempest" in p.name for p in paths)
