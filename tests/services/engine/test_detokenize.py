"""Incremental detokenisation against decoding everything at once."""

from services.engine.detokenize import TextTracker
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
