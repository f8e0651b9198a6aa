"""Baselines on tiny pairs: Block Influence against a direct computation, ShortGPT against the kept teacher
layers run on their own, LaCo's merged weights, the naive baseline against the old naive family,
`boomerang eval --baselines` end to end, and the shared-prefix runs exactly equal to whole-model forwards."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from services.corpora import shakespeare_files
from services.errors import InvalidRequestError
from services.eval.baselines import prepare_baselines
from services.eval.baselines.build import MergedLayers, build_model, merged_layer
from services.eval.baselines.calibration import calibration_text
from services.eval.baselines.laco import final_hidden, similarity_to
from services.eval.baselines.plans import identity_recipe, merge, shortgpt_keep
from services.eval.baselines.prefix import PrefixRunner
from services.eval.baselines.shortgpt import block_influence
from services.eval.curve import RecipePerplexity, naive_family, perplexity
from services.eval.texts import HELD_OUT_TEXTS, eval_chunks
from services.family import load_family
from services.family.architectures import get_path, set_path
from services.family.assembly import make_template
from services.family.plan import StudentLayout
from services.family.student_init import init_student

REPO = Path(__file__).resolve().parents[3]


def chunks_of(family, num_chunks=2, seq_len=32):
    return eval_chunks(HELD_OUT_TEXTS["python_docs"](), family.tokenizer, num_chunks, seq_len)  # [chunks, seq]


@torch.no_grad()
def reference_influence(model, spec, chunks) -> torch.Tensor:
    """1 − mean cos between consecutive `hidden_states`, with the final norm taken out so the last layer's
    output is its own."""
    norm = get_path(model, spec.norm)
    set_path(model, spec.norm, nn.Identity())
    try:
        states = model(chunks, use_cache=False, output_hidden_states=True).hidden_states  # L+1 x [b, seq, hidden]
    finally:
        set_path(model, spec.norm, norm)
    return torch.stack([1 - nn.functional.cosine_similarity(a, b, dim=-1).mean()
                        for a, b in zip(states[:-1], states[1:])])


def test_block_influence_equals_a_direct_computation(tiny_pair):
    family = load_family(*tiny_pair, device="cpu")
    chunks = chunks_of(family, 3)
    measured = torch.tensor(block_influence(family.teacher, family.spec, chunks, batch_size=2))  # [layers]
    torch.testing.assert_close(measured, reference_influence(family.teacher, family.spec, chunks))


@torch.no_grad()
def test_shortgpt_model_is_the_kept_teacher_layers_run_alone(tiny_pair):
    family = load_family(*tiny_pair, device="cpu")
    chunks = chunks_of(family)
    influence = block_influence(family.teacher, family.spec, chunks)
    teacher_params = {p.data_ptr() for p in family.teacher.parameters()}
    for n in family.sizes:
        kept = shortgpt_keep(influence, n)
        pruned = build_model(family, identity_recipe(kept))
        reference = init_student(family.teacher, StudentLayout(family.teacher.config.num_hidden_layers, kept))
        torch.testing.assert_close(pruned(chunks, use_cache=False).logits, reference(chunks, use_cache=False).logits)
        assert {p.data_ptr() for p in pruned.parameters()} <= teacher_params  # referenced, never copied
        prompt = chunks[:1, :8]  # [1, 8]
        cached = pruned.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(cached, reference.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))


@torch.no_grad()
def test_laco_merged_layer_is_theta_l_plus_the_differences(llama_pair):
    family = load_family(*llama_pair, device="cpu")
    layers = get_path(family.teacher, family.spec.layers)
    before = {k: v.clone() for k, v in family.teacher.state_dict().items()}
    recipe = merge(identity_recipe(range(len(layers))), 3, 3)
    merged = merged_layer(layers, recipe[3])
    for name, param in merged.named_parameters():
        theta = [layers[i].get_parameter(name) for i in range(3, 7)]
        torch.testing.assert_close(param, theta[0] + sum(t - theta[0] for t in theta[1:]))
    assert all(torch.equal(v, family.teacher.state_dict()[k]) for k, v in before.items())  # teacher untouched
    model = build_model(family, recipe)
    assert get_path(model, family.spec.layers)[4] is layers[7] and model.config.num_hidden_layers == 5
    assert torch.isfinite(model(chunks_of(family), use_cache=False).logits).all()


@torch.no_grad()
def test_naive_baseline_equals_the_naive_family(llama_pair):
    family = load_family(*llama_pair, device="cpu")
    naive = prepare_baselines(["naive"], family, None)["naive"]
    old = naive_family(family)
    chunks = chunks_of(family)
    for n in family.sizes:
        assert torch.equal(naive.model(family, n)(chunks, use_cache=False).logits,
                           old.variant(n)(chunks, use_cache=False).logits)


def test_calibration_text_is_never_the_held_out_play(llama_pair):
    family = load_family(*llama_pair, device="cpu")
    text = calibration_text("shakespeare", family.tokenizer, 2, 32)
    assert text.chunks.shape == (2, 32) and not any("tempest" in f for f in text.files)
    held_out = eval_chunks(HELD_OUT_TEXTS["shakespeare_tempest"](), family.tokenizer, 2, 32)
    assert not torch.equal(text.chunks, held_out)
    tempest = shakespeare_files(held_out_only=True)
    with pytest.raises(InvalidRequestError, match="held-out"):
        calibration_text(",".join(map(str, tempest)), family.tokenizer, 2, 32)


def test_cli_reports_every_baseline_at_every_size(llama_pair, tmp_path):
    base = [sys.executable, "-m", "services.cli", "eval", "--teacher", str(llama_pair[0]), "--student",
            str(llama_pair[1]), "--chunks", "2", "--seq-len", "32", "--decode-tokens", "4", "--calibration-chunks",
            "4", "--calibration-seq-len", "32", "--out", str(tmp_path)]
    result = subprocess.run(base + ["--baselines", "naive,shortgpt,laco"], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "curve.json").read_text())
    names = ["naive", "shortgpt", "laco"]
    assert list(report["baselines"]) == names and report["calibration"]["data"] == "shakespeare"
    assert report["baselines"]["laco"]["settings"]["threshold"] > 0
    for row in report["sizes"]:
        assert list(row["baselines"]) == names and row["naive_perplexity"] == row["baselines"]["naive"]
        assert all(math.isfinite(p) for texts in row["baselines"].values() for p in texts.values())
        assert all(len(report["baselines"][name]["layers"][str(row["num_layers"])]) == row["num_layers"]
                   for name in names)
    teacher = report["sizes"][-1]
    assert all(teacher["baselines"][name] == teacher["perplexity"] for name in names)
    header = (tmp_path / "curve.md").read_text().splitlines()[0]
    assert all(f"{name} {text}" in header for name in names for text in report["texts"])
    assert len(result.stdout.strip().splitlines()) == len(report["sizes"])

    refused = subprocess.run(base + ["--baselines", "naive,sparsegpt"], cwd=REPO, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "unknown baseline 'sparsegpt'" in refused.stderr


def prepared_all(family):
    calibration = calibration_text("shakespeare", family.tokenizer, 4, 32)
    return prepare_baselines(["naive", "shortgpt", "laco"], family, calibration)


@torch.no_grad()
def test_prefix_runner_is_exactly_the_whole_model_and_runs_a_shared_bottom_once(tiny_pair):
    family = load_family(*tiny_pair, device="cpu")
    batches = list(chunks_of(family, 3).split(2))  # two batches, as the curve splits its windows
    runner = PrefixRunner(family, batches, make_template(family.teacher, family.teacher), MergedLayers())
    bottom, calls = get_path(family.teacher, family.spec.layers)[0], []
    for baseline in prepared_all(family).values():
        for n in reversed(family.sizes):
            handle = bottom.register_forward_pre_hook(lambda *_: calls.append(1))
            try:
                logits = runner.run(baseline.recipes[n], lambda output, _: output.logits)
            finally:
                handle.remove()
            whole = baseline.model(family, n)
            assert all(torch.equal(got, whole(batch, use_cache=False).logits) for got, batch in zip(logits, batches))
    assert len(calls) == len(batches)  # teacher layer 0 ran for the first recipe only: every other one reused it


def test_recipe_perplexity_equals_the_perplexity_of_the_built_model(llama_pair):
    family = load_family(*llama_pair, device="cpu")
    texts = {"python_docs": chunks_of(family, 3)}
    measure = RecipePerplexity(family, texts, make_template(family.teacher, family.teacher), batch_size=2)
    for baseline in prepared_all(family).values():
        for n in family.sizes:
            assert measure(baseline.recipes[n]) == {"python_docs": perplexity(baseline.model(family, n),
                                                                              texts["python_docs"], batch_size=2)}


def test_laco_similarity_equals_a_forward_of_the_built_model(llama_pair):
    family = load_family(*llama_pair, device="cpu")
    samples = calibration_text("shakespeare", family.tokenizer, 3, 16).chunks  # [3, 16]
    template = make_template(family.teacher, family.teacher)
    similarity = similarity_to(family, samples, template)
    reference = final_hidden(family.teacher, samples)
    recipe = identity_recipe(range(family.teacher.config.num_hidden_layers))
    for position, following in ((5, 2), (3, 1), (2, 1), (1, 1)):  # top down, as the search walks
        recipe = merge(recipe, position, following)
        direct = nn.functional.cosine_similarity(final_hidden(build_model(family, recipe), samples), reference, dim=-1)
        assert similarity(recipe) == float(direct.mean())
