"""Rotary lookups against the model's own rotary module: identical values, growing past the first block."""

import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from services.cpu.rotary_table import MIN_POSITIONS, rotary_lookup
from tests.conftest import tiny_config


def _module(**rope) -> LlamaRotaryEmbedding:
    config = tiny_config("llama", vocab_size=64)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, **rope}
    return LlamaRotaryEmbedding(config)


def _reference(rotary, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = rotary(torch.empty(len(positions), 1, 1), positions[:, None])  # [batch, 1, head_dim]
    return cos[:, 0], sin[:, 0]


def test_table_matches_the_module_and_grows():
    rotary = _module()
    lookup = rotary_lookup(rotary)
    for positions in (torch.tensor([0, 5, 17]), torch.tensor([3, MIN_POSITIONS * 3 + 1])):
        cos, sin = lookup(positions)
        expected_cos, expected_sin = _reference(rotary, positions)
        torch.testing.assert_close(cos, expected_cos, rtol=0, atol=0)
        torch.testing.assert_close(sin, expected_sin, rtol=0, atol=0)
    table = rotary.__dict__["_boomerang_rotary_table"]
    assert table.tables[0].shape[0] > MIN_POSITIONS * 3 + 1
    assert rotary_lookup(rotary).__self__ is table  # one table per module


def test_dynamic_rope_calls_the_module_every_time():
    rotary = _module(rope_type="dynamic", factor=2.0)
    lookup = rotary_lookup(rotary)
    positions = torch.tensor([1, 9])
    cos, sin = lookup(positions)
    expected_cos, expected_sin = _reference(rotary, positions)
    torch.testing.assert_close(cos, expected_cos, rtol=0, atol=0)
    torch.testing.assert_close(sin, expected_sin, rtol=0, atol=0)
    assert "_boomerang_rotary_table" not in rotary.__dict__
