"""Structured output on a tiny random pair: every answer parses, at every size, beside unconstrained rows."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from services.engine.engine import EngineLimits, InferenceEngine
from services.engine.interface import SamplingParams
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
    schema = SamplingParams(max_tokens=40, temperature=0, structured=("json_schema", json.dumps(SCHEMA)))
    sampled = SamplingParams(max_tokens=40, temperature=1.0, seed=3, structured=("json_schema", json.dumps(SCHEMA)))
    regex = SamplingParams(max_tokens=40, temperature=0, structured=("regex", r"[0-9]{3}-[a-z]{2}"))
    free = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    requests = [(n, PROMPTS[i % 4], params) for i, n in enumerate(sizes) for params in (schema, sampled, regex)]
    requests += [(sizes[0], PROMPTS[1], free), (sizes[-1], PROMPTS[2], free)]

    async def together():
        return await asyncio.gather(*[_run(engine, *request) for request in requests])

    for (size, prompt, params), (text, tokens, finish) in zip(requests, asyncio.run(together())):
        if params is free:
            assert tokens == _greedy_reference(engine.family.variant(size), prompt, 6)  # untouched by the others
        elif params.structured[0] == "regex":
            assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text) and finish == "stop", text
        else:
            jsonschema.validate(json.loads(text), SCHEMA)
            assert finish == "stop"


def test_a_schema_that_cannot_compile_is_the_clients_error(engine):
    bad = SamplingParams(max_tokens=8, structured=("json_schema", json.dumps({"type": "nonsense"})))
    with pytest.raises(InvalidRequestError) as error:
        asyncio.run(_run(engine, engine.family.sizes[0], PROMPTS[0], bad))
    assert error.value.param == "response_format" and "nonsense" in error.value.message
