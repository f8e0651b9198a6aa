"""Incremental detokenisation against decoding everything at once."""

import random

import pytest

from services.engine.detokenize import TextTracker, text_decoder
from tests.conftest import make_tokenizer

TEXT = "héllo wörld, 日本語 and ünïcödé — to be, or not to be! 🙂 done"


def test_deltas_reassemble_the_full_text_without_broken_characters():
    tokenizer = make_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    tracker = TextTracker(tokenizer)
    deltas = [tracker.push(token)[0] for token in ids]
    deltas.append(tracker.flush())
    assert "".join(deltas) == tokenizer.decode(ids) == TEXT
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_is_found_across_tokens_and_never_emitted():
    tokenizer = make_tokenizer()
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    tracker = TextTracker(tokenizer, stop=("or not",))
    emitted = ""
    for token in ids:
        delta, stopped = tracker.push(token)
        emitted += delta
        if stopped:
            break
    assert stopped and emitted == TEXT[: TEXT.find("or not")]


@pytest.mark.parametrize("clean_up", [False, True])
def test_the_decoder_matches_the_tokenizer_with_special_tokens_skipped(clean_up):
    tokenizer = make_tokenizer()
    tokenizer.clean_up_tokenization_spaces = clean_up
    decode, rng = text_decoder(tokenizer), random.Random(0)
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id, tokenizer.bos_token_id]
    for _ in range(50):
        window = [rng.choice(ids) for _ in range(rng.randint(1, 8))]
        assert decode(window) == tokenizer.decode(window, skip_special_tokens=True)
