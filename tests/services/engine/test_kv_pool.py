"""The KV pool: blocks reused across takes, the budget respected, every byte accounted for."""

import pytest
import torch

from services.engine.kv_pool import KVPool


def test_a_given_back_block_is_reused_by_the_next_take_that_fits():
    pool = KVPool(torch.float32)
    first = pool.take((2, 3, 10, 4))
    pointer = first.data_ptr()
    pool.give([first])
    again = pool.take((2, 3, 8, 4))  # smaller: the same block serves it
    assert again.data_ptr() == pointer and again.shape == (2, 3, 8, 4)
    assert pool.reserved_bytes == 2 * 3 * 10 * 4 * 4 and pool.in_use_bytes == pool.reserved_bytes
    bigger = pool.take((2, 3, 20, 4))  # none free fits: a new block
    assert bigger.data_ptr() != pointer
    assert pool.reserved_bytes == (240 + 480) * 4
    pool.give([again, bigger])
    assert pool.in_use_bytes == 0 and pool.reserved_bytes == (240 + 480) * 4


def test_the_smallest_free_block_that_fits_is_taken():
    pool = KVPool(torch.float32)
    blocks = [pool.take((n,)) for n in (100, 10, 50)]
    pointers = {b.numel(): b.data_ptr() for b in blocks}
    pool.give(blocks)
    assert pool.take((40,)).data_ptr() == pointers[50]
    assert pool.take((5,)).data_ptr() == pointers[10]


def test_free_blocks_go_back_to_the_allocator_beyond_the_budget():
    pool = KVPool(torch.float32, budget_bytes=4 * 1000)
    small = pool.take((600,))
    pool.give([small])
    big = pool.take((900,))  # 600 free + 900 new would pass the budget: the free block is dropped first
    assert pool.reserved_bytes == 900 * 4 and pool.in_use_bytes == 900 * 4
    over = pool.take((500,))  # nothing free to drop: in-use blocks are never taken away
    assert pool.reserved_bytes == 1400 * 4
    pool.give([big, over])


def test_giving_back_a_buffer_the_pool_never_gave_is_an_error():
    pool = KVPool(torch.float32)
    with pytest.raises(KeyError):
        pool.give([torch.empty(4)])


def test_free_blocks_nobody_took_for_a_while_go_back_to_the_allocator():
    pool = KVPool(torch.float32, idle_s=60.0)
    early, late, kept = pool.take((100,)), pool.take((50,)), pool.take((10,))
    pool.give([early])
    given = pool._given_at[id(pool._free[0][2])]
    pool.give([late])
    pool._given_at[id(next(b for n, _, b in pool._free if n == 50))] = given + 30  # given back half a minute later
    assert pool.release_idle(now=given + 59) == 0
    assert pool.release_idle(now=given + 60) == 100 * 4  # only the block idle for a minute
    assert pool.reserved_bytes == (50 + 10) * 4 and pool.in_use_bytes == 10 * 4
    assert pool.take((40,)).numel() == 40 and pool.reserved_bytes == (50 + 10) * 4  # the other one is reused
    pool.give([kept])


def test_a_free_block_more_than_twice_the_size_asked_is_left_for_a_larger_take():
    pool = KVPool(torch.float32)
    big = pool.take((100,))
    pool.give([big])
    small = pool.take((10,))  # 100 would waste 90: a block of its own
    assert small.data_ptr() != big.data_ptr() and pool.reserved_bytes == 110 * 4
    assert pool.take((60,)).data_ptr() == big.data_ptr()
