"""Measurements for `boomerang bench`: memory, switching cost, per-size speed, bandwidth bound.

Every figure is a ratio against a baseline measured in the same process and run.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable

import torch

from services.cpu.fast_linear import disable_fast_linear
from services.cpu.kernels.gemv import load_stream_sum
from services.engine.batch import Sequence
from services.engine.family_batch import FamilyBatch
from services.engine.interface import SamplingParams
from services.engine.kv_pool import KVPool
from services.family import Family
from services.family.int8 import disable_int8_kernel
from services.family.plan import order_to_json
from services.family.q4 import disable_q4_kernel
from services.family.reference import build_reference


def rss_bytes() -> int:
    """Resident set size of this process, from /proc."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(work: Callable[[], object], repeats: int = 3) -> float:
    """Median seconds of `work` over `repeats` runs."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def memory_and_switching(family: Family, sizes: list[int], rss_before_load: int, load_seconds: float) -> dict:
    """RSS of all sizes assembled vs teacher+student alone and vs deep-copied per-size models; assembly times."""
    gc.collect()
    rss_pair = rss_bytes()
    assembly = {}
    for n in family.sizes:
        start = time.perf_counter()
        family.variant(n)
        assembly[n] = time.perf_counter() - start
    cached = {n: timed(lambda n=n: family.variant(n), repeats=5) for n in family.sizes}
    gc.collect()
    rss_family = rss_bytes()
    copied = list(family.layout.copied_teacher_layers)
    references, deepcopy_s = [], {}
    for n in sizes:
        start = time.perf_counter()
        reference = build_reference(
            family.teacher, family.student, copied, family.plan(n).patched_blocks, order_to_json(family.order)
        )
        disable_fast_linear(reference)  # the baseline is stock transformers (int8: dequantized in torch)
        disable_int8_kernel(reference)
        disable_q4_kernel(reference)
        references.append(reference)
        deepcopy_s[n] = time.perf_counter() - start
    gc.collect()
    rss_references = rss_bytes()
    pair_bytes = rss_pair - rss_before_load
    per_layer = {n: assembly[n] / n * 1e3 for n in family.sizes}
    reference_s = {n: load_seconds + deepcopy_s[n] for n in sizes}
    return {
        "rss_teacher_plus_student_mb": pair_bytes / 2**20,
        "rss_all_sizes_assembled_mb": (rss_family - rss_before_load) / 2**20,
        "ratio_all_sizes_vs_pair": (rss_family - rss_before_load) / pair_bytes,
        "rss_deep_copied_sizes_mb": (rss_references - rss_family) / 2**20,
        "deep_copied_sizes": sizes,
        "ratio_deep_copies_vs_family": (rss_references - rss_family + pair_bytes) / (rss_family - rss_before_load),
        "assembly_ms": {n: v * 1e3 for n, v in assembly.items()},
        "assembly_ms_per_layer_max": max(per_layer.values()),
        "cached_lookup_us": {n: v * 1e6 for n, v in cached.items()},
        "reference_build_s": reference_s,
        "switch_speedup_first_use": min(reference_s[n] / assembly[n] for n in sizes),
        "switch_speedup_cached": min(reference_s[n] / cached[n] for n in sizes),
    }, dict(zip(sizes, references))


def _runner(
    family: Family, num_layers: int, batch: int, prompt: list[int], max_tokens: int, pool: KVPool
) -> FamilyBatch:
    """The batch the server runs, on `batch` greedy copies of `prompt` all of size `num_layers` (not yet
    prefilled); its KV buffers come from `pool`, as the engine's do."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    seqs = [Sequence(list(prompt), params, lambda _: None, num_layers=num_layers) for _ in range(batch)]
    return FamilyBatch(family, seqs, family.tokenizer, {family.tokenizer.eos_token_id}, pad_id=0, pool=pool)


def _ours_decode(
    family: Family, num_layers: int, batch: int, prompt: list[int], steps: int, pool: KVPool
) -> tuple[float, float]:
    """(prefill seconds, decode seconds for `steps` steps) of the serving batch."""
    runner = _runner(family, num_layers, batch, prompt, steps + 1, pool)
    start = time.perf_counter()
    runner.prefill()
    prefilled = time.perf_counter()
    _advance_by(runner, steps)
    decoded = time.perf_counter()
    runner.release()
    return prefilled - start, decoded - prefilled


def _advance_by(runner: FamilyBatch, steps: int) -> None:
    for _ in range(steps):
        runner.step()


@torch.inference_mode()
def _standalone_decode(model, batch: int, prompt: list[int], steps: int) -> float:
    """Seconds per `steps` decode steps of HF `generate()`, prefill subtracted."""
    ids = torch.tensor([prompt] * batch, device=next(model.parameters()).device)

    def run(new_tokens: int) -> float:
        return timed(
            lambda: model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            ),
            repeats=1,
        )

    run(2)
    return run(steps + 1) - run(1)


def speed_per_size(
    family: Family, references: dict, batch_sizes: list[int], steps: int, prompt_len: int = 32, prefill_len: int = 256
) -> list[dict]:
    """Per size: decode tokens/s of the serving batch (rows all of that size: prefill, then `steps` timed
    steps) at each batch size, against transformers' `generate()` on a deep-copied model; and prefill time."""
    span = min(1000, len(family.tokenizer) - 10)
    prompt = [10 + i % span for i in range(prompt_len)]
    long_prompt = [10 + i % span for i in range(prefill_len)]
    long_ids = torch.tensor([long_prompt])  # [1, prefill_len]
    pool = KVPool(family.dtype, device=family.device)
    rows = []
    for n, reference in references.items():
        row = {"num_layers": n, "bytes": family.size_info(n).bytes}
        for batch in batch_sizes:
            _ours_decode(family, n, batch, prompt, 2, pool)  # warm-up
            _, ours = _ours_decode(family, n, batch, prompt, steps, pool)
            theirs = _standalone_decode(reference, batch, prompt, steps)
            row[f"tok_s_b{batch}"] = batch * steps / ours
            row[f"standalone_tok_s_b{batch}"] = batch * steps / theirs
            row[f"ratio_b{batch}"] = theirs / ours
        ours_prefill = statistics.median(_ours_decode(family, n, 1, long_prompt, 0, pool)[0] for _ in range(3))
        with torch.inference_mode():
            theirs_prefill = timed(lambda r=reference: r(long_ids, use_cache=True, logits_to_keep=1))
        row.update(
            prefill_ms=ours_prefill * 1e3,
            standalone_prefill_ms=theirs_prefill * 1e3,
            prefill_ratio=theirs_prefill / ours_prefill,
        )
        rows.append(row)
    return rows


def _matmuls_alone(family: Family, num_layers: int) -> Callable[[], None]:
    """Every Linear of a size once on one row, nothing else (each runs as the variant runs it)."""
    linears = [m for m in family.variant(num_layers).modules() if isinstance(m, torch.nn.Linear)]
    inputs = {m.in_features: torch.randn(1, m.in_features, dtype=family.dtype) for m in linears}  # [1, in]

    @torch.inference_mode()
    def run() -> None:
        for module in linears:
            module(inputs[module.in_features])  # [1, out]

    return run


def _read_probes(data: torch.Tensor) -> dict[str, Callable[[], object]]:
    """Ways to read `data` once: torch's sum, and the GEMV kernel's own read loop where it is built."""
    probes = {"torch_sum": data.sum}
    stream_sum = load_stream_sum()
    if stream_sum is not None:
        probes["stream_sum"] = lambda: stream_sum(data)
    return probes


def bandwidth_bound(
    family: Family, rows: list[dict], prompt_len: int = 32, rounds: int = 9, steps: int = 8, megabytes: int = 256
) -> float:
    """Adds to each row the batch-1 decode rate that reading every weight once per token allows, our
    fraction of it, and the same for the weight matmuls alone; returns the median bandwidth seen.

    This machine's bandwidth moves with its neighbours' load (26 to 81 GB/s within an hour here), so each
    round reads it right before timing `steps` decode steps and one pass of the matmuls alone, and each
    fraction is the median over rounds of rate / bound at that moment. The bandwidth of a round is the
    faster of two plain reads of 256 MiB (torch's sum, and the GEMV's read loop; median of three each): the
    bound is the best read rate measured, not one method's. The matmuls alone bound what any decode loop
    over these kernels can reach.
    """
    data = torch.randn(megabytes * 2**20 // 4)
    probes = _read_probes(data)
    for probe in probes.values():
        probe()
    seen, pool = [], KVPool(family.dtype, device=family.device)
    prompt = [10 + i % min(1000, len(family.tokenizer) - 10) for i in range(prompt_len)]
    for row in rows:
        runner = _runner(family, row["num_layers"], 1, prompt, rounds * steps + 4, pool)
        runner.prefill()
        runner.step()
        matmuls = _matmuls_alone(family, row["num_layers"])
        matmuls()
        rates, fractions, matmul_fractions, bandwidths = [], [], [], []
        probe_rates = {name: [] for name in probes}
        for _ in range(rounds):
            for name, probe in probes.items():
                probe_rates[name].append(data.numel() * 4 / timed(probe, repeats=3) / 1e9)
            bandwidth = max(seen_rates[-1] for seen_rates in probe_rates.values())
            bound = bandwidth * 1e9 / row["bytes"]  # tokens/s
            start = time.perf_counter()
            _advance_by(runner, steps)
            rates.append(steps / (time.perf_counter() - start))
            fractions.append(rates[-1] / bound)
            matmul_fractions.append(1 / timed(matmuls, repeats=1) / bound)
            bandwidths.append(bandwidth)
        row["bandwidth_gbs"] = statistics.median(bandwidths)
        row["bandwidth_probes_gbs"] = {name: statistics.median(values) for name, values in probe_rates.items()}
        row["bound_tok_s_b1"] = row["bandwidth_gbs"] * 1e9 / row["bytes"]
        row["fraction_of_bound_b1"] = statistics.median(fractions)
        row["rounds_tok_s_b1"] = statistics.median(rates)  # the decode rate behind the fraction
        row["matmul_only_fraction_of_bound"] = statistics.median(matmul_fractions)
        row["matmul_only_tok_s_b1"] = row["matmul_only_fraction_of_bound"] * row["bound_tok_s_b1"]
        seen += bandwidths
        runner.release()
    return statistics.median(seen)
