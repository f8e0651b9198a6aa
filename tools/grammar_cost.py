"""Per-token cost of a JSON-schema grammar on CPU: llguidance (what serves) against xgrammar, the same tokenizer
walking the same answer: each token's allowed-token bitmask, then the token consumed. Not part of the project's
dependencies; xgrammar is installed apart:

    .venv/bin/pip install --target /tmp/xgpkgs --no-deps xgrammar apache-tvm-ffi
    PYTHONPATH=/tmp/xgpkgs .venv/bin/python tools/grammar_cost.py
"""
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import llguidance.torch as llt  # noqa: E402
import torch  # noqa: E402
import xgrammar as xgr  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from services.engine.interface import StructuredOutput  # noqa: E402
from services.engine.structured import GrammarCompiler  # noqa: E402

TOKENIZER = Path(__file__).resolve().parents[1] / "models_store" / ".cache" / "smollm2-135m-instruct"
VOCAB = 49152
SCHEMA = {"type": "object", "required": ["name", "age", "foods"],
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                         "foods": {"type": "array", "items": {"type": "string"}}}}
ANSWER = {"name": "Whiskers the cat of the house", "age": 7, "foods": ["tuna", "chicken", "salmon", "cream", "mice"]}
STRUCTURED = StructuredOutput("json_schema", json.dumps(SCHEMA), "response_format")


def llguidance_walk(tokenizer, ids: list[int]) -> float:
    """Seconds per token: the served matcher's bitmask, then the token."""
    matcher = GrammarCompiler(tokenizer, VOCAB).matcher(STRUCTURED)
    bitmask = llt.allocate_token_bitmask(1, VOCAB)
    start = time.perf_counter()
    for token in ids:
        llt.fill_next_token_bitmask(matcher, bitmask, 0)
        assert matcher.consume_token(token), token
    return (time.perf_counter() - start) / len(ids)


def xgrammar_walk(compiled, ids: list[int]) -> float:
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, VOCAB)
    start = time.perf_counter()
    for token in ids:
        matcher.fill_next_token_bitmask(bitmask, 0)
        assert matcher.accept_token(token), token
    return (time.perf_counter() - start) / len(ids)


def timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def main() -> None:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    ids = tokenizer(json.dumps(ANSWER), add_special_tokens=False)["input_ids"]
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=VOCAB)

    def xgrammar_compile():
        return xgr.GrammarCompiler(info, cache_enabled=False).compile_json_schema(
            json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))

    compiled, served = xgrammar_compile(), GrammarCompiler(tokenizer, VOCAB)
    served.matcher(STRUCTURED)  # the tokenizer's view is built once per server
    walks = {"llguidance": lambda: llguidance_walk(tokenizer, ids), "xgrammar": lambda: xgrammar_walk(compiled, ids)}
    report = {"tokens": len(ids)}
    for name, walk in walks.items():
        walk()
        report[f"{name}_us_per_token"] = round(1e6 * statistics.median(walk() for _ in range(7)), 1)
    report["llguidance_compile_ms"] = round(1e3 * statistics.median(
        timed(lambda: served.matcher(STRUCTURED)) for _ in range(3)), 1)
    report["xgrammar_compile_ms"] = round(1e3 * statistics.median(timed(xgrammar_compile) for _ in range(3)), 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
