"""What structured output costs a decode step: the serving batch at batch 1, with and without a grammar.

The grammar (`response_format` json_object) is compiled once, outside the timing; each step then pays for the
matcher's mask and its application to the logits, which is what a user asking for JSON pays per token.
"""

from __future__ import annotations

import time

from services.engine.batch import Sequence
from services.engine.family_batch import FamilyBatch
from services.engine.interface import SamplingParams, StructuredOutput
from services.engine.kv_pool import KVPool
from services.engine.structured import GrammarCompiler
from services.family import Family

PROMPT = "Describe a cat as a JSON object with its name, age and favourite food."


def _seconds_per_token(family: Family, prompt: list[int], steps: int, matcher, pool: KVPool) -> float:
    """Decode seconds per token of one greedy row (prefill not counted); the row may end early under a grammar
    (its JSON closes), so the time is divided by the tokens it took."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0, ignore_eos=matcher is None)
    seq = Sequence(list(prompt), params, lambda _: None, num_layers=min(family.sizes), matcher=matcher)
    runner = FamilyBatch(family, [seq], family.tokenizer, {family.tokenizer.eos_token_id}, pad_id=0, pool=pool)
    try:
        runner.prefill()
        taken = len(seq.tracker.token_ids)
        start = time.perf_counter()
        while not runner.done:
            runner.step()
        seconds = time.perf_counter() - start
        return seconds / max(1, len(seq.tracker.token_ids) - taken)
    finally:
        runner.release()


def structured_output_cost(family: Family, steps: int = 32, rounds: int = 3) -> dict:
    """Decode tokens/s at batch 1 of the smallest size, plain and under a json_object grammar (alternating,
    best of `rounds` each), and the grammar's cost as a share of the plain rate."""
    tokenizer = family.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                         add_generation_prompt=True)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    compiler = GrammarCompiler(tokenizer, family.teacher.config.vocab_size)
    structured = StructuredOutput("json_object", "", "response_format")
    pool = KVPool(family.dtype, device=family.device)
    plain, constrained = [], []
    for _ in range(rounds):
        plain.append(_seconds_per_token(family, prompt, steps, None, pool))
        constrained.append(_seconds_per_token(family, prompt, steps, compiler.matcher(structured), pool))
    plain_rate, constrained_rate = 1 / min(plain), 1 / min(constrained)
    return {"num_layers": min(family.sizes), "plain_tok_s_b1": plain_rate, "json_object_tok_s_b1": constrained_rate,
            "cost_fraction": 1 - constrained_rate / plain_rate}
