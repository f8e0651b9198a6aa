"""`boomerang synth --chat`: conversations in the teacher's template, resumable, refused without a template."""

import json
import shutil

import pytest
import torch

from services.errors import TrainingConfigError
from services.train import chat_synth
from services.train.chat_synth import ChatTurns, synthesize_chats, user_header
from services.train.synth import SynthConfig


def _fake_sample(model, tokenizer, prompts, max_new_tokens, temperature, end_ids):
    """Seeded like the real sampler (by the round): a fifth of the turns never end."""
    numbers = torch.randint(1000, (len(prompts),)).tolist()
    return ChatTurns([f"turn number {n} of the chat" for n in numbers], [n % 5 != 0 for n in numbers])


def _config(teacher, out, **overrides) -> SynthConfig:
    values = dict(teacher=str(teacher), out=str(out), tokens=400, batch_size=6, max_new_tokens=24, device="cpu")
    return SynthConfig(**{**values, **overrides})


def test_conversations_are_in_the_template_and_a_cut_answer_ends_its_conversation(llama_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(chat_synth, "sample", _fake_sample)
    out = tmp_path / "chat.jsonl"
    summary = synthesize_chats(_config(llama_pair[0], out, tokens=1500))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary["tokens"] == sum(r["tokens"] for r in records) >= 1500
    for record in records:
        text = record["text"]
        assert text.count("<|im_start|>user\n") == record["turns"] in (1, 2)
        assert text.count("<|im_start|>assistant\n") == record["turns"]
        assert text.endswith("of the chat" if record["cut"] else "of the chat<|im_end|>\n")
    assert any(r["turns"] == 2 for r in records) and any("<|im_start|>system" in r["text"] for r in records)
    assert any(r["cut"] for r in records) and not all(r["cut"] for r in records)
    assert not any(r["cut"] and r["turns"] == 2 and r["text"].count("of the chat<|im_end|>") < 2 for r in records)


def test_a_resumed_chat_run_writes_what_one_run_writes(llama_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(chat_synth, "sample", _fake_sample)
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    synthesize_chats(_config(llama_pair[0], whole))
    synthesize_chats(_config(llama_pair[0], parts, tokens=100))
    synthesize_chats(_config(llama_pair[0], parts, resume=True))
    assert parts.read_text() == whole.read_text()


def test_a_teacher_with_no_chat_template_is_refused(llama_pair, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(llama_pair[0], teacher)
    config_path = teacher / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    (teacher / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(TrainingConfigError, match="no chat template"):
        synthesize_chats(_config(teacher, tmp_path / "chat.jsonl"))


def test_a_teacher_that_never_ends_a_turn_stops_with_a_clear_error(llama_pair, tmp_path, monkeypatch):
    monkeypatch.setattr(chat_synth, "sample", lambda *args: ChatTurns(["never ending"] * len(args[2]),
                                                                      [False] * len(args[2])))
    with pytest.raises(TrainingConfigError, match="finished no conversation"):
        synthesize_chats(_config(llama_pair[0], tmp_path / "chat.jsonl"))


def test_the_user_header_is_the_template_up_to_the_user_text(llama_pair):
    from services.family.loading import load_tokenizer

    tokenizer = load_tokenizer(str(llama_pair[0]))
    assert user_header(tokenizer, []) == "<|im_start|>user\n"
    history = [{"role": "system", "content": "Be brief."}]
    assert user_header(tokenizer, history) == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"


def _sample_by_size(model, tokenizer, prompts, max_new_tokens, temperature, end_ids):
    """Says which size wrote each turn."""
    return ChatTurns([f"written by {model.config.num_hidden_layers} layers"] * len(prompts), [True] * len(prompts))


def test_answers_by_the_family_s_sizes_are_written_by_those_sizes(llama_pair, tmp_path, monkeypatch):
    from tests.services.store.test_store import make_store_pair

    monkeypatch.setenv("BOOMERANG_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(chat_synth, "sample", _sample_by_size)
    pair = make_store_pair(llama_pair, tmp_path, packed=False)
    out = tmp_path / "chat.jsonl"
    synthesize_chats(_config(llama_pair[0], out, answer_num_layers=(5, 7), pair=str(pair), tokens=600))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {r["answer_num_layers"] for r in records} == {5, 7}
    for record in records:
        turns = record["text"].split("<|im_start|>")
        users = [t for t in turns if t.startswith("user\n")]
        answers = [t for t in turns if t.startswith("assistant\n")]
        assert all("written by 8 layers" in t for t in users)
        assert all(f"written by {record['answer_num_layers']} layers" in t for t in answers)


def test_an_answer_size_the_family_lacks_is_refused(llama_pair, tmp_path, monkeypatch):
    from services.errors import UnknownSizeError
    from tests.services.store.test_store import make_store_pair

    monkeypatch.setenv("BOOMERANG_CACHE_DIR", str(tmp_path / "cache"))
    pair = make_store_pair(llama_pair, tmp_path, packed=False)
    with pytest.raises(UnknownSizeError, match="sizes are"):
        synthesize_chats(_config(llama_pair[0], tmp_path / "chat.jsonl", answer_num_layers=(99,), pair=str(pair)))
