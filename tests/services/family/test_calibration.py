from pathlib import Path

from services.family import calibration
from tests.conftest import make_tokenizer

LINE = "Now is the winter of our discontent, made glorious summer. "
PLAY = "\n\n".join(f"Passage {i}: " + LINE * 3 for i in range(900))


def _play(tmp_path: Path) -> list[Path]:
    path = tmp_path / "play.txt"
    path.write_text(PLAY)
    return [path]


def test_windows_are_raw_text_then_conversations_in_the_chat_template(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "shakespeare_files", lambda: _play(tmp_path))
    tokenizer = make_tokenizer()
    windows = calibration.calibration_windows(tokenizer)  # [windows, seq_len]
    raw = calibration.CALIBRATION_WINDOWS
    assert windows.shape == (2 * raw, calibration.CALIBRATION_SEQ_LEN)
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert not bool((windows[:raw] == start).any()) and bool((windows[raw:] == start).any(dim=1).all())


def test_without_a_chat_template_or_enough_text_the_windows_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr(calibration, "shakespeare_files", lambda: _play(tmp_path))
    windows = calibration.calibration_windows(make_tokenizer(chat_template=None))
    assert windows.shape == (calibration.CALIBRATION_WINDOWS, calibration.CALIBRATION_SEQ_LEN)
    monkeypatch.setattr(calibration, "CALIBRATION_WINDOWS", 10_000)
    assert calibration.calibration_windows(make_tokenizer()) is None
