"""The memory bound: the formula on a small config, and the refusal of limits the machine cannot hold."""

from types import SimpleNamespace

import pytest

from services.engine.memory import available_bytes, check_fits, kv_bytes_per_token, memory_bound
from services.errors import MemoryLimitError

CONFIG = SimpleNamespace(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, vocab_size=320)


def test_kv_bytes_per_token_counts_keys_and_values_of_every_layer():
    assert kv_bytes_per_token(CONFIG, 4) == 2 * 8 * 2 * 16 * 4
    no_head_dim = SimpleNamespace(**{**vars(CONFIG), "head_dim": None})
    assert kv_bytes_per_token(no_head_dim, 2) == 2 * 8 * 2 * (64 // 4) * 2


def test_the_bound_follows_the_limits_not_the_traffic():
    per_token = kv_bytes_per_token(CONFIG, 4)
    mixed = memory_bound(CONFIG, 4, 1000, context=256, max_batch_size=8, max_concurrent=16, mixed=True)
    assert mixed.kv_bytes == 8 * (4 * 256 + 3 * 64) * per_token
    one_size = memory_bound(CONFIG, 4, 1000, context=256, max_batch_size=8, max_concurrent=16, mixed=False)
    assert one_size.kv_bytes == 16 * (4 * 256 + 3 * 64) * per_token  # a batch per size: every row may be in one
    prefill = 8 * 256 * (256 + (4 * 64 + 3 * 128) * 4)
    assert mixed.work_bytes == max(prefill, (8 * 64 + 2 * 320) * 256 * 4)
    assert mixed.total_bytes == 1000 + mixed.kv_bytes + mixed.work_bytes
    twice = memory_bound(CONFIG, 4, 1000, context=256, max_batch_size=16, max_concurrent=16, mixed=True)
    assert twice.kv_bytes == 2 * mixed.kv_bytes


def test_limits_beyond_the_memory_left_are_refused_with_one_line():
    bound = memory_bound(CONFIG, 4, 10 ** 9, context=256, max_batch_size=8, max_concurrent=16, mixed=True)
    check_fits(bound, available=bound.total_bytes)  # the weights are loaded already: they need no room
    check_fits(bound, available=None)  # unknown: not refused
    with pytest.raises(MemoryLimitError) as refused:
        check_fits(bound, available=bound.kv_bytes)
    assert "--max-total-tokens" in refused.value.message and "\n" not in refused.value.message


def test_the_memory_left_is_read_from_the_machine():
    left = available_bytes()
    assert left is None or left > 0
