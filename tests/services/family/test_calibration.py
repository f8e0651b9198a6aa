from pathlib import Path

import torch

from services.family import calibration, load_family
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


def test_matrices_that_read_one_input_share_its_statistics(llama_pair):
    family = load_family(*llama_pair, device="cpu")
    matrices = calibration.student_matrices(family)
    windows = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(0))  # [4, 16]
    stats = calibration.input_stats(family, list(matrices.values()), windows)
    assert set(stats) == {m.weight.data_ptr() for m in matrices.values()}
    layer = next(name.rsplit(".", 2)[0] for name in matrices if name.endswith("self_attn.q_proj"))

    def of(name: str):
        return stats[matrices[f"{layer}.{name}"].weight.data_ptr()]

    assert of("self_attn.q_proj") is of("self_attn.k_proj") is of("self_attn.v_proj")
    assert of("mlp.gate_proj") is of("mlp.up_proj") and of("self_attn.o_proj") is not of("self_attn.q_proj")
    hessian = of("mlp.down_proj").hessian  # [inter, inter]
    torch.testing.assert_close(hessian, hessian.T)
    assert float(torch.linalg.eigvalsh(hessian.double()).min()) > -1e-6  # a mean of x xᵀ: never negative
