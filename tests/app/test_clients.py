"""Real client libraries, unchanged, against the real server on loopback over a tiny random pair:
LangChain's `ChatOpenAI` and lm-evaluation-harness's `local-completions` model."""

import json
from typing import Literal

import httpx
import pytest
import torch
from pydantic import BaseModel

from app.main import create_app
from app.settings import Settings
from tests.conftest import LiveServer

SIZE = 6  # the tiny pair's sizes are 4..8 layers


@pytest.fixture(scope="module")
def server(llama_pair):
    settings = Settings(teacher=str(llama_pair[0]), student=str(llama_pair[1]), device="cpu", name="tiny",
                        max_concurrent=8, max_queue=32, max_total_tokens=96)  # bounds answers sent no max_tokens
    with LiveServer(create_app(settings)) as live:
        yield live


@pytest.fixture(scope="module")
def chat_model(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    return langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=f"tiny-{SIZE}L",
                                       temperature=0, max_retries=0, stream_usage=True)


# -- LangChain ------------------------------------------------------------------------------------------------


def test_langchain_invoke_and_stream_give_the_same_answer(chat_model):
    answer = chat_model.invoke("Hello!")  # no max_tokens: the answer runs to the end of its turn or the context
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    assert answer.response_metadata["model_name"] == f"tiny-{SIZE}L"
    assert answer.usage_metadata["output_tokens"] > 0
    chunks = list(chat_model.stream("Hello!"))
    assert "".join(chunk.content for chunk in chunks) == answer.content
    assert len(chunks) > 2  # streamed token by token, not as one block
    whole = sum(chunks[1:], chunks[0])
    assert whole.usage_metadata == answer.usage_metadata  # stream_options.include_usage


class City(BaseModel):
    name: Literal["Paris", "Rome", "Oslo"]
    coastal: bool


def test_langchain_structured_output_parses_into_the_schema(chat_model):
    """LangChain's default method is json_schema (response_format); tools are refused where the template has
    none, so function_calling is not tried."""
    structured = chat_model.bind(max_tokens=40).with_structured_output(City, method="json_schema",
                                                                      include_raw=True)
    out = structured.invoke("Name a European capital.")
    assert out["parsing_error"] is None
    assert isinstance(out["parsed"], City)
    assert City.model_validate(json.loads(out["raw"].content)) == out["parsed"]


def test_langchain_tools_get_a_400_naming_the_field(chat_model):
    openai = pytest.importorskip("openai")

    def capital(country: str) -> str:
        """The capital of a country."""
        return country

    with pytest.raises(openai.BadRequestError) as refused:
        chat_model.bind_tools([capital]).invoke("Capital of France?")
    assert refused.value.body["param"] == "tools"


# -- lm-evaluation-harness ------------------------------------------------------------------------------------

PAIRS = [("To be, or not to be,", " that is the question"), ("The quick brown fox", " jumps over the lazy dog"),
         ("Hello", " world!"), ("0123", "456789"), ("whether tis nobler in the mind", " to suffer")]


@pytest.fixture(scope="module")
def lmeval_model(server, monkeypatch_module):
    pytest.importorskip("lm_eval")
    from lm_eval.api.registry import get_model

    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")  # the tokenizer must come from our server, not the Hub
    monkeypatch_module.setenv("TRANSFORMERS_OFFLINE", "1")
    return get_model("local-completions")(base_url=server.url + "/v1/completions", model=f"tiny-{SIZE}L",
                                          batch_size=4)


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def _instances(kind: str, arguments: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def _continuation_logprob(server, context: str, continuation: str) -> float:
    """Ours, by /v1/score: the continuation's tokens in the whole text's tokenization, as lm-eval splits them."""
    scored = httpx.post(server.url + "/v1/score", json={"text": context + continuation, "num_layers": SIZE}).json()
    context_tokens = httpx.post(server.url + "/tokenize", json={"prompt": context}).json()["count"]
    return sum(scored["token_logprobs"][context_tokens:])


def _offline(server, context: str, continuation: str) -> tuple[float, bool]:
    """The same from the size assembled in process, with no server code in between, and whether every
    continuation token is the argmax."""
    family = server.app.state.engine.family
    ids = family.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    start = len(family.tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logits = family.variant(SIZE)(torch.tensor([ids]), use_cache=False).logits[0, start - 1:-1]
    targets = torch.tensor(ids[start:])
    logprobs = torch.log_softmax(logits.float(), -1)[torch.arange(len(targets)), targets]
    return float(logprobs.sum()), bool((logits.argmax(-1) == targets).all())


def test_lm_eval_local_completions_uses_our_tokenizer_with_no_tokenizer_argument(lmeval_model, server):
    assert lmeval_model.tokenizer_backend == "remote"
    family = server.app.state.engine.family
    assert lmeval_model.tok_encode("To be, or not") == family.tokenizer("To be, or not",
                                                                         add_special_tokens=False)["input_ids"]
    assert lmeval_model.eot_token_id == family.tokenizer.eos_token_id
    assert lmeval_model.tokenizer.bos_token_id == family.tokenizer.bos_token_id


def test_lm_eval_log_likelihoods_equal_our_score_and_the_offline_variant(lmeval_model, server):
    greedy = httpx.post(server.url + "/v1/completions", json={"model": f"tiny-{SIZE}L", "prompt": "Hello world",
                                                              "max_tokens": 3, "temperature": 0}).json()
    pairs = [*PAIRS, ("Hello world", greedy["choices"][0]["text"])]  # one continuation lm-eval must call greedy
    results = lmeval_model.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    assert len(results) == len(pairs) and results[-1][1]
    for (context, continuation), (logprob, is_greedy) in zip(pairs, results):
        offline, greedy = _offline(server, context, continuation)
        assert logprob == pytest.approx(_continuation_logprob(server, context, continuation), abs=1e-3)
        assert logprob == pytest.approx(offline, abs=1e-3)
        assert is_greedy == greedy


def test_lm_eval_multiple_choice_runs_the_context_once_and_keeps_every_number(lmeval_model, server, monkeypatch):
    from services.engine import scoring

    packed = []
    real = scoring._score_packed
    monkeypatch.setattr(scoring, "_score_packed", lambda model, prompts, groups, *rest: packed.append(
        [len(g.members) for g in groups]) or real(model, prompts, groups, *rest))
    context = "To be, or not to be, that is the question: whether tis nobler"
    pairs = [(context, choice) for choice in (" in the mind", " to suffer", " A", " the slings and arrows")]
    results = lmeval_model.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    assert packed == [[4]]  # one request of four prompts, one row: the context once, then each choice
    for (context, choice), (logprob, is_greedy) in zip(pairs, results):
        offline, greedy = _offline(server, context, choice)
        assert logprob == pytest.approx(offline, abs=1e-3) and is_greedy == greedy


def test_lm_eval_rolling_log_likelihood_equals_our_score(lmeval_model, server):
    """Perplexity tasks: the whole text given the prefix token, as one request."""
    text = "To be, or not to be, that is the question"
    [total] = lmeval_model.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    family = server.app.state.engine.family
    ids = [lmeval_model.prefix_token_id, *family.tokenizer(text, add_special_tokens=False)["input_ids"]]
    body = httpx.post(server.url + "/v1/completions", json={"model": f"tiny-{SIZE}L", "prompt": ids, "max_tokens": 0,
                                                            "echo": True, "logprobs": 0}).json()
    assert total == pytest.approx(sum(body["choices"][0]["logprobs"]["token_logprobs"][1:]), abs=1e-3)


def test_lm_eval_generate_until_stops_at_its_stop_string(lmeval_model, server):
    requests = [("To be, or not", {"until": ["\n"], "max_gen_toks": 8}),
                ("The quick brown fox", {"until": [" the"], "max_gen_toks": 8, "temperature": 0})]
    answers = lmeval_model.generate_until(_instances("generate_until", requests), disable_tqdm=True)
    for (context, gen_kwargs), answer in zip(requests, answers):
        assert all(stop not in answer for stop in gen_kwargs["until"])
        ours = httpx.post(server.url + "/v1/completions", json={
            "model": f"tiny-{SIZE}L", "prompt": context, "max_tokens": 8, "temperature": 0,
            "stop": gen_kwargs["until"]}).json()
        assert answer == ours["choices"][0]["text"]


def test_lm_eval_requests_take_one_forward_when_the_pair_sets_a_presence_penalty(lmeval_model, server,
                                                                                  monkeypatch):
    """The default pair's sampling defaults must not send lm-eval's requests back to two passes each: the first
    token has no answer tokens before it for a presence or frequency penalty to count."""
    engine = server.app.state.engine
    monkeypatch.setattr(engine, "sampling_defaults", lambda: {"presence_penalty": 1.0, "frequency_penalty": 0.5})
    generations = []
    original = engine.generate
    monkeypatch.setattr(engine, "generate", lambda *args: generations.append(args) or original(*args))
    results = lmeval_model.loglikelihood(_instances("loglikelihood", PAIRS[:2]), disable_tqdm=True)
    assert len(results) == 2
    assert generations == []  # the token came from the scoring forward
