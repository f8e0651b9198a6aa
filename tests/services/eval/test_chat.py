"""Chat quality per size: degenerate answers recognised, log-likelihoods checked against a plain forward."""

import pytest
import torch

from services.eval.chat import (
    MULTIPLE_CHOICE,
    continuation_logprobs,
    default_system_prompt,
    degenerate,
    evaluate_chat,
    markdown_table,
)
from services.family import load_family

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.mark.parametrize("answer, kind", [
    ("", "empty"), ("   ", "empty"),
    (SYSTEM + ".", "system"),
    ("What is the capital of France? It is Paris.", "echo"),
    ("the sun the sun the sun is up the sun the sun the sun is up the sun the sun the sun is up", "loop"),
    ("The capital of France is Paris.", None),
    ("Red, blue and yellow are the primary colors.", None),
])
def test_degenerate_answers_are_named(answer, kind):
    assert degenerate(answer, "What is the capital of France?", SYSTEM) == kind


def test_the_default_system_prompt_is_read_from_the_template(llama_pair):
    family = load_family(*llama_pair, device="cpu")
    assert default_system_prompt(family.tokenizer) == ""  # the tiny template adds none


def test_continuation_logprobs_match_a_forward_of_each_row_alone(llama_pair):
    family = load_family(*llama_pair, device="cpu")
    model = family.variant(family.sizes[0])
    prompts, continuations = [[5, 17, 42, 7], [99, 3]], [[11, 12], [40, 41, 42]]
    got = continuation_logprobs(model, prompts, continuations, pad_id=0)
    for prompt, continuation, total in zip(prompts, continuations, got):
        ids = torch.tensor([prompt + continuation])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids, use_cache=False).logits[0].float(), -1)
        want = sum(float(logprobs[len(prompt) - 1 + i, token]) for i, token in enumerate(continuation))
        torch.testing.assert_close(torch.tensor(total), torch.tensor(want), rtol=1e-4, atol=1e-4)


def test_every_size_is_measured_and_the_teacher_agrees_with_itself(llama_pair):
    family = load_family(*llama_pair, device="cpu")
    report = evaluate_chat(family, max_new_tokens=6, prompts=("Hello there", "Name a color.", "Count to three."),
                           progress=False)
    rows = {row["num_layers"]: row for row in report["sizes"]}
    assert list(rows) == family.sizes
    teacher = rows[max(family.sizes)]
    assert teacher["agreement"] == 1.0  # its greedy answers are the reference
    for row in rows.values():
        assert row["answer_perplexity"] > 1 and 0 <= row["degenerate_rate"] <= 1
        assert 0 <= row["multiple_choice_accuracy"] <= 1 and sum(row["degenerate"].values()) == len(
            row["degenerate_prompts"])
    assert report["multiple_choice"] == len(MULTIPLE_CHOICE)
    assert markdown_table(report).count("\n") == len(family.sizes) + 2


def test_answers_are_decoded_with_the_pair_s_defaults_and_without_them_beside(llama_pair, monkeypatch):
    from services.eval import chat

    family = load_family(*llama_pair, device="cpu")
    family.sampling_defaults = {"presence_penalty": 1.5}
    seen = []
    real = chat.greedy_answers

    def recording(model, tokenizer, prompts, max_new_tokens, end_ids, defaults=None):
        seen.append((model.config.num_hidden_layers, defaults))
        return real(model, tokenizer, prompts, max_new_tokens, end_ids, defaults)

    monkeypatch.setattr(chat, "greedy_answers", recording)
    report = evaluate_chat(family, max_new_tokens=6, prompts=("Hello there", "Count to three."), progress=False)
    teacher, served = max(family.sizes), {"presence_penalty": 1.5}
    assert seen[:2] == [(teacher, None), (teacher, served)]  # the plain reference, then the served one
    for n in family.sizes:
        assert (n, served) in seen and (n, None) in seen
    assert report["sampling_defaults"] == served
    rows = {row["num_layers"]: row for row in report["sizes"]}
    assert rows[teacher]["agreement"] == 1.0  # served answers against the served reference
    assert all(0 <= row["degenerate_rate_without_defaults"] <= 1 for row in rows.values())


@pytest.mark.parametrize("defaults", [{"repetition_penalty": 2.0}, {"presence_penalty": 2.0},
                                      {"frequency_penalty": 1.5}])
def test_the_eval_s_answers_are_the_serving_batch_s(llama_pair, defaults):
    """The eval decodes as the server does: the serving batch with the same penalties picks the same tokens as
    the eval's greedy answers (and the penalties change them)."""
    from services.engine.batch import Sequence
    from services.engine.family_batch import FamilyBatch
    from services.engine.interface import SamplingParams
    from services.eval.chat import greedy_answers

    family = load_family(*llama_pair, device="cpu")
    tokenizer, n = family.tokenizer, min(family.sizes)
    prompt = tokenizer("Hello there, hello there, hello")["input_ids"]
    ends = {tokenizer.eos_token_id}

    def served(settings: dict) -> list[int]:
        params = SamplingParams(max_tokens=12, temperature=0, **settings)
        seq = Sequence(list(prompt), params, lambda _: None, num_layers=n)
        batch = FamilyBatch(family, [seq], tokenizer, ends, pad_id=0)
        batch.prefill()
        while not batch.done:
            batch.step()
        batch.release()
        return [token for token in seq.tracker.token_ids if token not in ends]

    evaluated = greedy_answers(family.variant(n), tokenizer, [prompt], 12, ends, defaults)[0]
    assert served(defaults) == evaluated
    assert served({}) != evaluated
