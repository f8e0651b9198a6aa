"""The engine's batch: rows of any sizes decode as each size's transformers forward would, one row alone;
joins, KV buffers from the pool, and the engine serving through it with native kernels on or off."""

import asyncio
import random
import time

import pytest
import torch

from services.engine.batch import Sequence
from services.engine.engine import EngineLimits, InferenceEngine
from services.engine.family_batch import FamilyBatch
from services.engine.interface import SamplingParams
from services.engine.kv_pool import KVPool
from services.family import load_family
from services.family.kv_buffer import MIN_CAPACITY
from tests.services.engine.reference import forward_logits, greedy_tokens

PROMPTS = [[5, 17, 42], [99, 7, 3, 250, 61, 11, 8], [12], [40, 41, 42, 43, 44], [8, 9]]


def _collect(sizes, prompts, max_tokens):
    outputs = [[] for _ in prompts]
    seqs = [Sequence(list(p), SamplingParams(max_tokens=m, temperature=0, ignore_eos=True),
                     lambda delta, out=out: out.extend(delta.token_ids), num_layers=n)
            for n, p, m, out in zip(sizes, prompts, max_tokens, outputs)]
    return seqs, outputs


def _run(batch) -> None:
    batch.prefill()
    while not batch.done:
        batch.step()


def _alone(family, n, prompt, max_tokens) -> list[int]:
    """The size's greedy tokens from its own transformers forward, the row alone."""
    return greedy_tokens(family.variant(n), prompt, max_tokens)


def test_a_batch_of_every_size_gives_each_size_its_own_greedy_tokens(tiny_pair):
    family = load_family(*tiny_pair, device="cpu")
    sizes = [family.sizes[i % len(family.sizes)] for i in range(len(PROMPTS))]
    max_tokens = [7, 4, 9, 6, 150]  # 150: the KV buffers outgrow their first capacity
    seqs, mixed = _collect(sizes, PROMPTS, max_tokens)
    batch = FamilyBatch(family, seqs, family.tokenizer, {2}, pad_id=0)
    _run(batch)
    whole = lambda positions: -(-positions // MIN_CAPACITY) * MIN_CAPACITY  # noqa: E731 - granules of positions
    first_capacity = whole(max(map(len, PROMPTS)) + MIN_CAPACITY + 1)
    grown = {keys.shape[2] for group in batch.groups[0] for keys in group.keys}  # a branch of finished rows stays
    assert first_capacity < max(grown) <= whole(max(map(len, PROMPTS)) + max(max_tokens) + 1)
    for n, prompt, m, got in zip(sizes, PROMPTS, max_tokens, mixed):
        assert got == _alone(family, n, prompt, m), (n, prompt)


def test_an_output_layer_both_models_share_is_read_once_for_all_rows(tiny_pair):
    family = load_family(*tiny_pair, device="cpu")
    family.student.lm_head.weight = family.teacher.lm_head.weight  # as the default pair's student does
    sizes = [family.sizes[0], family.sizes[-1], family.sizes[1]]  # student's and teacher's norm and head
    seqs, mixed = _collect(sizes, PROMPTS[:3], [6, 6, 6])
    batch = FamilyBatch(family, seqs, family.tokenizer, {2}, pad_id=0)
    assert len(batch.rows_by_source["head"]) == 2 and [rows.tolist() for _, rows in batch.rows_by_head] == [[0, 1, 2]]
    _run(batch)
    for n, prompt, got in zip(sizes, PROMPTS, mixed):
        assert got == _alone(family, n, prompt, 6), (n, prompt)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # the prefill's mask: boolean, then additive
def test_log_probs_match_the_transformers_forward(llama_pair, attention):
    family = load_family(*llama_pair, device="cpu")
    for model in (family.teacher, family.student):
        model.set_attn_implementation(attention)
    assert family.teacher.config._attn_implementation == attention
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, logprobs=2)
    rows = [(family.sizes[0], PROMPTS[1]), (family.sizes[-1], PROMPTS[1]), (family.sizes[0], PROMPTS[0])]
    mixed = [[] for _ in rows]  # per row: (token, its log-prob) per step
    seqs = [Sequence(list(prompt), params, lambda d, out=out: out.append((d.token_ids[0], d.logprobs[0].logprob)),
                     num_layers=n) for (n, prompt), out in zip(rows, mixed)]  # the shorter prompt is left-padded
    _run(FamilyBatch(family, seqs, family.tokenizer, {2}, pad_id=0))
    for (n, prompt), got in zip(rows, mixed):
        tokens = [token for token, _ in got]
        assert len(got) == params.max_tokens
        logprobs = torch.log_softmax(forward_logits(family.variant(n), prompt + tokens), dim=-1)  # [seen, vocab]
        want = [logprobs[len(prompt) - 1 + i, token] for i, token in enumerate(tokens)]
        torch.testing.assert_close(torch.tensor([lp for _, lp in got]), torch.stack(want), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("native", [True, False])  # off: the torch backend serves
def test_the_engine_puts_concurrent_sizes_in_one_batch(llama_pair, native):
    batches = []
    family = load_family(*llama_pair, device="cpu", name="tiny", native_kernels=native)
    engine = InferenceEngine(family, EngineLimits(max_batch_size=8, batch_wait_ms=50),
                             on_batch=lambda key, size: batches.append((key, size)))
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)

    async def run(n, prompt):
        return [t async for delta in engine.generate(n, prompt, params) for t in delta.token_ids]

    async def together():
        return await asyncio.gather(*[run(n, p) for n, p in zip(family.sizes, PROMPTS)])

    try:
        results = asyncio.run(together())
    finally:
        engine.close()
    assert batches == [("mixed", len(family.sizes))]
    for n, prompt, tokens in zip(family.sizes, PROMPTS, results):
        assert tokens == _alone(family, n, prompt, 6)


def _poisoned_pool(dtype) -> KVPool:
    """A pool whose free blocks hold NaN, as reused blocks may hold anything."""
    pool = KVPool(dtype)
    blocks = [pool.take((n,)) for n in (2 ** k for k in range(6, 18)) for _ in range(48)]
    for block in blocks:
        block.fill_(float("nan"))
    pool.give(blocks)
    return pool


@pytest.mark.parametrize("native", [True, False])  # on: the last chunk is short enough for the kernel's prompt path
def test_a_prompt_prefilled_in_chunks_decodes_as_one_prefilled_at_once(llama_pair, native):
    family = load_family(*llama_pair, device="cpu", native_kernels=native)
    prompts = [list(range(20, 115)), PROMPTS[1], PROMPTS[2]]  # 95, 7 and 1 tokens: early chunks all padding for two
    sizes = [family.sizes[0], family.sizes[-1], family.sizes[1]]
    seqs, at_once = _collect(sizes, prompts, [6, 6, 6])
    whole = FamilyBatch(family, seqs, family.tokenizer, {2}, pad_id=0)
    whole.prefill()
    seqs, chunked = _collect(sizes, prompts, [6, 6, 6])
    batch = FamilyBatch(family, seqs, family.tokenizer, {2}, pad_id=0)
    batch.start_prefill()
    assert batch.prompt_left == 95
    # 3 rows x 40 positions go to torch's layers; the last 15 positions, 45 rows, to the kernel where it is on
    assert [batch.prefill_chunk(40) for _ in range(3)] == [False, False, True]
    assert batch.prompt_left == 0 and batch.length == whole.length == 95
    for branches, whole_branches in zip(batch.groups, whole.groups):  # keys and values of every prompt token
        for group, whole_group in zip(branches, whole_branches):
            for mine, theirs in zip(group.keys + group.values, whole_group.keys + whole_group.values):
                for i, row in enumerate(group.row_list):  # padding's are masked, and each backend fills them its way
                    filled = batch.attention_mask[row, :95].bool()  # [95]
                    torch.testing.assert_close(mine[i, :, :95][:, filled], theirs[i, :, :95][:, filled],
                                               rtol=1e-4, atol=1e-5)
    for runner in (batch, whole):
        while not runner.done:
            runner.step()
    assert chunked == at_once
    for n, prompt, got in zip(sizes, prompts, chunked):
        assert got == _alone(family, n, prompt, 6), (n, prompt)


def test_rows_that_join_between_steps_decode_as_they_would_alone(tiny_pair):
    family = load_family(*tiny_pair, device="cpu")
    pool = _poisoned_pool(family.dtype)
    small, large, middle = family.sizes[0], family.sizes[-1], family.sizes[len(family.sizes) // 2]
    long_prompt = list(range(20, 35))  # longer than the running batch has filled: its rows get left padding
    waves = [([small, large, middle], PROMPTS[:3], [12, 2, 10]),  # the second row finishes before the join
             ([middle, small], [long_prompt, PROMPTS[4]], [6, 9]),
             ([large], [PROMPTS[2]], [5])]  # shorter than the batch has filled by then
    batch, outputs, runs = None, [], []
    for sizes, prompts, max_tokens in waves:
        seqs, got = _collect(sizes, prompts, max_tokens)
        newcomers = FamilyBatch(family, seqs, family.tokenizer, {2}, pad_id=0, pool=pool)
        newcomers.prefill()
        if batch is None:
            batch = newcomers
        else:
            live = sum(not seq.done for seq in batch.sequences)
            batch.join(newcomers)
            assert len(batch.sequences) == live + len(seqs)  # finished rows left
        outputs += got
        runs += zip(sizes, prompts, max_tokens)
        for _ in range(3):
            batch.step()
    while not batch.done:
        batch.step()
    for (n, prompt, m), got in zip(runs, outputs):
        assert got == _alone(family, n, prompt, m), (n, prompt)


def test_a_batch_kept_alive_by_joins_stays_as_long_as_its_longest_live_row(tiny_pair):
    """Each wave's rows outlive the previous wave's by a little, so the batch never ends; its filled length
    follows its live rows' own context instead of growing with every step it ever ran."""
    family = load_family(*tiny_pair, device="cpu")
    sizes = family.sizes
    batch, outputs, runs, steps = None, [], [], 0
    for wave in range(8):
        n, prompt = sizes[wave % len(sizes)], PROMPTS[wave % len(PROMPTS)]
        seqs, got = _collect([n], [prompt], [6])
        newcomers = FamilyBatch(family, seqs, family.tokenizer, {2}, pad_id=0)
        newcomers.prefill()
        if batch is None:
            batch = newcomers
        else:
            batch.join(newcomers)  # every row left is live: the length is the longest one's context
            assert batch.length == max(batch.span(row) for row in range(len(batch.sequences)))
            assert batch.length <= max(len(p) for p in PROMPTS) + 6
        outputs += got
        runs.append((n, prompt))
        for _ in range(4):
            batch.step()
            steps += 1
        assert not batch.done
    assert steps > batch.length  # without trimming it would hold every step since the first prompt
    while not batch.done:
        batch.step()
    for (n, prompt), got in zip(runs, outputs):
        assert got == _alone(family, n, prompt, 6), (n, prompt)


@pytest.mark.parametrize(("join", "native"), [(True, True), (False, True), (True, False)])
def test_a_request_arriving_mid_batch_joins_it_instead_of_waiting_for_it(llama_pair, join, native):
    batches = []
    family = load_family(*llama_pair, device="cpu", name="tiny", native_kernels=native)
    engine = InferenceEngine(family, EngineLimits(max_batch_size=8, batch_wait_ms=5, join_batches=join),
                             on_batch=lambda key, size: batches.append((key, size)))
    long, short = (SamplingParams(max_tokens=m, temperature=0, ignore_eos=True) for m in (240, 4))
    finished = []

    async def run(n, prompt, params, name):
        tokens = [t async for delta in engine.generate(n, prompt, params) for t in delta.token_ids]
        finished.append(name)
        return tokens

    async def staggered():
        first = asyncio.create_task(run(family.sizes[-1], PROMPTS[1], long, "long"))
        while engine.scheduler.num_running == 0 and not first.done():  # the long request is decoding
            await asyncio.sleep(0.001)
        second = await run(family.sizes[0], PROMPTS[0], short, "short")
        return await first, second

    try:
        long_tokens, short_tokens = asyncio.run(staggered())
    finally:
        engine.close()
    assert finished == (["short", "long"] if join else ["long", "short"])  # without joins it waits
    assert batches == [("mixed", 1), ("mixed", 1)]
    for n, prompt, m, tokens in [(family.sizes[-1], PROMPTS[1], 240, long_tokens),
                                 (family.sizes[0], PROMPTS[0], 4, short_tokens)]:
        assert tokens == _alone(family, n, prompt, m)


def test_branches_only_finished_rows_take_are_not_run(tiny_pair):
    family = load_family(*tiny_pair, device="cpu")
    seqs, _ = _collect([family.sizes[0], family.sizes[-1]], PROMPTS[:2], [2, 8])
    batch = FamilyBatch(family, seqs, family.tokenizer, {2}, pad_id=0)
    batch.prefill()
    calls = []  # per run: (its rows, how many steps ran it)
    for run in batch.runs:
        counter = [tuple(run.row_list), 0]
        calls.append(counter)

        class Counting:
            def step(self, *args, backend=run.decode, counter=counter):
                counter[1] += 1
                return backend.step(*args)
        run.decode = Counting()
    while not batch.done:
        batch.step()  # the small row finishes after its first step; the large one takes 7
    assert sorted((rows, count) for rows, count in calls) == [((0,), 1), ((1,), 7)]  # no shared branch: a run each


def test_kv_buffers_are_reused_across_batches_and_all_given_back(llama_pair):
    """Waves of staggered requests of random sizes: every buffer goes back to the pool when its batch ends
    or joins another, and what the pool keeps stays within the limits' KV bound."""
    family = load_family(*llama_pair, device="cpu", name="tiny")
    engine = InferenceEngine(family, EngineLimits(max_batch_size=4, batch_wait_ms=2))
    rng = random.Random(0)

    async def client(delay: float) -> None:
        await asyncio.sleep(delay)
        params = SamplingParams(max_tokens=rng.randint(2, 30), temperature=rng.choice([0, 0.8]), ignore_eos=True)
        async for _ in engine.generate(rng.choice(family.sizes), rng.choice(PROMPTS), params):
            pass

    async def wave() -> None:
        await asyncio.gather(*[client(rng.random() * 0.05) for _ in range(10)])

    try:
        reserved = []
        for _ in range(4):
            asyncio.run(wave())
            deadline = time.monotonic() + 5
            while engine.scheduler.active and time.monotonic() < deadline:  # the last step's batch leaving
                time.sleep(0.01)
            assert engine.kv_pool.in_use_bytes == 0
            reserved.append(engine.kv_pool.reserved_bytes)
        assert 0 < max(reserved) <= engine.memory_bound.kv_bytes
        assert engine.stats()["kv_reserved_bytes"] == reserved[-1]
    finally:
        engine.close()


def test_rows_of_one_size_step_in_one_run_and_mixed_sizes_share_runs(tiny_pair):
    """A batch of one size steps all its layers in one backend call; in a mixed batch, each run is a span of
    consecutive blocks taken by the same rows, and every row still walks its size's layers in order."""
    family = load_family(*tiny_pair, device="cpu")
    one, _ = _collect([family.sizes[0]] * 2, PROMPTS[:2], [4, 4])
    batch = FamilyBatch(family, one, family.tokenizer, {2}, pad_id=0)
    batch.prefill()
    assert len(batch.runs) == 1 and len(batch.runs[0].keys()) == family.sizes[0]
    mixed, _ = _collect(family.sizes, PROMPTS[:len(family.sizes)], [4] * len(family.sizes))
    batch = FamilyBatch(family, mixed, family.tokenizer, {2}, pad_id=0)
    batch.prefill()
    for row, n in enumerate(batch.sizes):
        layers = [module for run in batch.runs if row in run.row_list for group in run.groups
                  for module in group.modules]
        assert len(layers) == n
    assert len(batch.runs) < sum(len(branches) for branches in batch.groups)
