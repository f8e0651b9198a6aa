"""The in-place KV layer against plain concatenation: same keys and values, views of one growing buffer."""

import torch

from services.family.kv_buffer import MIN_CAPACITY, GrowingLayer


def _chunks(generator, sizes):
    return [(torch.randn(2, 3, n, 4, generator=generator), torch.randn(2, 3, n, 4, generator=generator))
            for n in sizes]


def test_appends_like_concatenation_and_reallocates_by_doubling():
    layer, generator = GrowingLayer(), torch.Generator().manual_seed(0)
    chunks = _chunks(generator, [50] + [1] * 100)  # a prefill, then decode steps
    buffers = set()
    for i, (k, v) in enumerate(chunks):
        keys, values = layer.update(k, v)
        buffers.add(layer._key_buffer.data_ptr())
        torch.testing.assert_close(keys, torch.cat([c[0] for c in chunks[: i + 1]], dim=-2), rtol=0, atol=0)
        torch.testing.assert_close(values, torch.cat([c[1] for c in chunks[: i + 1]], dim=-2), rtol=0, atol=0)
    assert layer.get_seq_length() == 150
    assert len(buffers) == 3 and layer._key_buffer.shape[-2] == 4 * MIN_CAPACITY  # 64 -> 128 -> 256


def test_crop_then_update_continues_from_the_cropped_states():
    layer, generator = GrowingLayer(), torch.Generator().manual_seed(1)
    (k1, v1), (k2, v2) = _chunks(generator, [10, 3])
    layer.update(k1, v1)
    layer.crop(-4)  # keep 6
    keys, _ = layer.update(k2, v2)
    torch.testing.assert_close(keys, torch.cat([k1[..., :6, :], k2], dim=-2), rtol=0, atol=0)


def test_reserve_and_advance_let_a_writer_fill_positions_in_place():
    layer, generator = GrowingLayer(), torch.Generator().manual_seed(2)
    (k1, v1), *steps = _chunks(generator, [MIN_CAPACITY - 1, 1, 1, 1])
    layer.update(k1, v1)
    for i, (k, v) in enumerate(steps):
        keys, values, length = layer.reserve(1)  # [batch, kv_heads, capacity, head_dim]
        assert length == MIN_CAPACITY - 1 + i and keys.shape[-2] > length
        keys[..., length, :], values[..., length, :] = k[..., 0, :], v[..., 0, :]
        layer.advance(length + 1)
        assert layer.filled() == length + 1
    assert layer._key_buffer.shape[-2] == 2 * MIN_CAPACITY  # grew once, keeping what was written
    torch.testing.assert_close(layer.keys, torch.cat([k1] + [k for k, _ in steps], dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(layer.values, torch.cat([v1] + [v for _, v in steps], dim=-2), rtol=0, atol=0)


def test_a_recorded_advance_reads_and_crops_like_a_filled_cache():
    layer, generator = GrowingLayer(), torch.Generator().manual_seed(3)
    (k1, v1), (k2, v2), (k3, v3) = _chunks(generator, [5, 1, 2])
    layer.update(k1, v1)
    keys, values, length = layer.reserve(1)
    keys[..., length, :], values[..., length, :] = k2[..., 0, :], v2[..., 0, :]
    layer.advance(length + 1)
    assert layer.get_seq_length() == 6
    layer.crop(-2)  # keep 4
    out_keys, out_values = layer.update(k3, v3)
    torch.testing.assert_close(out_keys, torch.cat([k1[..., :4, :], k3], dim=-2), rtol=0, atol=0)
    torch.testing.assert_close(out_values, torch.cat([v1[..., :4, :], v3], dim=-2), rtol=0, atol=0)
