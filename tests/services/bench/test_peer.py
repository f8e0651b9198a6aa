"""The llama.cpp side-by-side bench's pure parts (the peer itself is not built in CI): the requantized GGUF,
prompts of exact lengths, and ratios that read "above 1: ours is better"."""

import stat

from services.bench.peer import PEER_TYPES, Prompts, peer_gguf, prompt_of, ratios
from tests.conftest import make_tokenizer


def test_ratios_favour_higher_rates_and_lower_times():
    ours = {"decode_tokens_per_s": 60.0, "first_token_ms_32": 20.0, "clients_16_tokens_per_s": 300.0,
            "rss_mib": 400.0, "prompt_tokens_32": 32}
    theirs = {"decode_tokens_per_s": 30.0, "first_token_ms_32": 40.0, "clients_16_tokens_per_s": 600.0,
              "rss_mib": 200.0, "prompt_tokens_32": 32}
    assert ratios(ours, theirs) == {"decode_tokens_per_s": 2.0, "first_token_ms_32": 2.0,
                                    "clients_16_tokens_per_s": 0.5, "rss_mib": 0.5}


def test_prompts_have_exactly_the_asked_number_of_tokens_and_never_repeat():
    tokenizer = make_tokenizer()
    prompts = Prompts(tokenizer)
    seen = set()
    for length in (32, 512, 32, 32):
        text = prompts.next(length)
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == length
        seen.add(text)
    assert len(seen) == 4 and prompt_of(tokenizer, 32, 1) != prompt_of(tokenizer, 32, 2)


def test_the_peer_gets_the_same_bits_per_weight_requantized_once(tmp_path):
    calls = tmp_path / "calls"
    quantize = tmp_path / "bin" / "llama-quantize"
    quantize.parent.mkdir()
    quantize.write_text(f'#!/bin/sh\necho "$@" >> {calls}\ncp "$2" "$3"\n')
    quantize.chmod(quantize.stat().st_mode | stat.S_IEXEC)
    source = tmp_path / "teacher.Q4_1.gguf"
    source.write_bytes(b"GGUF")
    for _ in range(2):
        made = peer_gguf(quantize.with_name("llama-server"), source, "int8", tmp_path / "out")
    assert made.name == "teacher.Q4_1.Q8_0.gguf" and made.read_bytes() == b"GGUF"
    assert calls.read_text().split() == ["--allow-requantize", str(source), str(made.with_suffix(".partial")), "Q8_0"]
    assert PEER_TYPES == {"float": "F32", "int8": "Q8_0", "q4": "Q4_1"}
    assert peer_gguf(quantize.with_name("llama-server"), source, "q4", tmp_path / "out") == source  # its own type
    assert len(calls.read_text().splitlines()) == 1
