"""Structured output on a tiny random pair: every answer parses, at every size, beside unconstrained rows."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from services.engine.engine import EngineLimits, InferenceEngine
from services.engine.interface import SamplingParams, StructuredOutput
from services.engine.structured import allowed_tokens
from services.errors import InvalidRequestError
from services.family import load_family
from tests.services.engine.test_engine import PROMPTS, _greedy_reference, _run

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no", "maybe"]},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["answer", "score"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(tiny_pair):
    engine = InferenceEngine(load_family(*tiny_pair, device="cpu", name="tiny"),
                             EngineLimits(max_concurrent=16, max_queue=16, batch_wait_ms=20))
    yield engine
    engine.close()


def test_answers_follow_the_schema_or_regex_at_every_size_beside_free_rows(engine):
    sizes = engine.family.sizes
    as_schema = StructuredOutput("json_schema", json.dumps(SCHEMA), "response_format")
    schema = SamplingParams(max_tokens=40, temperature=0, structured=as_schema)
    sampled = SamplingParams(max_tokens=40, temperature=1.0, seed=3, structured=as_schema)
    pattern = StructuredOutput("regex", r"[0-9]{3}-[a-z]{2}", "guided_regex")
    regex = SamplingParams(max_tokens=40, temperature=0, structured=pattern)
    free = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    requests = [(n, PROMPTS[i % 4], params) for i, n in enumerate(sizes) for params in (schema, sampled, regex)]
    requests += [(sizes[0], PROMPTS[1], free), (sizes[-1], PROMPTS[2], free)]

    async def together():
        return await asyncio.gather(*[_run(engine, *request) for request in requests])

    for (size, prompt, params), (text, tokens, finish) in zip(requests, asyncio.run(together())):
        if params is free:
            assert tokens == _greedy_reference(engine.family.variant(size), prompt, 6)  # untouched by the others
        elif params.structured.kind == "regex":
            assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text) and finish == "stop", text
        else:
            jsonschema.validate(json.loads(text), SCHEMA)
            assert finish == "stop"


def test_a_schema_that_cannot_compile_is_the_clients_error(engine):
    for text, field in ((json.dumps({"type": "nonsense"}), "response_format"), ("[1]", "guided_json")):
        bad = SamplingParams(max_tokens=8, structured=StructuredOutput("json_schema", text, field))
        with pytest.raises(InvalidRequestError) as error:
            asyncio.run(_run(engine, engine.family.sizes[0], PROMPTS[0], bad))
        assert error.value.param == field, error.value.message
    assert engine.stats()["in_flight"] == 0  # a refused grammar gives its slot back


def test_the_bitmask_unpacks_to_the_tokens_llguidance_allows():
    import llguidance.torch
    import torch

    torch.manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, 5), dtype=torch.int32)  # [rows, words]
    logits = torch.randn(3, 150)  # [rows, vocab]: the last word only partly used
    theirs = logits.clone()
    llguidance.torch.apply_token_bitmask_inplace(theirs, bitmask)
    ours = logits.masked_fill(~allowed_tokens(bitmask, 150), float("-inf"))
    torch.testing.assert_close(ours, theirs)
