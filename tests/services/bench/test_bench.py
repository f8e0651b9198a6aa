"""Smoke run of `boomerang bench --quick` on a tiny pair: it runs and writes a well-formed report."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_quick_bench_writes_report_and_chart(llama_pair, tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "services.cli", "bench", "--teacher", str(llama_pair[0]), "--student",
           str(llama_pair[1]), "--out", str(out), "--quick"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((out / "bench.json").read_text())
    assert set(report["goals"]) == {"ratio_all_sizes_vs_pair", "switch_speedup_first_use", "min_speed_ratio",
                                    "min_fraction_of_bound_b1", "served_speedup_n16", "served_speedup_n16_mixed_sizes",
                                    "structured_output_cost_b1", "prompt_mid_stream_longest_gap",
                                    "mixed_prompt_lengths_throughput"}
    for goal in report["goals"].values():
        assert isinstance(goal["measured"], float) and isinstance(goal["met"], bool)
    assert [row["num_layers"] for row in report["speed"]] == report["settings"]["sizes"]
    assert all(row["tok_s_b1"] > 0 and row["standalone_tok_s_b1"] > 0 for row in report["speed"])
    assert [r["concurrency"] for r in report["served"]["mixed_sizes"]] == [1, 4, 16]
    for scenario in ("arrival_mid_batch", "arrival_mid_batch_without_joins"):
        arrival = report["served"][scenario]
        assert arrival["short_alone_s"] > 0 and arrival["short_slowdown"] > 0 and arrival["long_slowdown"] > 0
    for scenario in ("prompt_mid_stream", "prompt_mid_stream_whole_prefill"):
        mid_stream = report["served"][scenario]
        assert mid_stream["prompt_alone_s"] > 0
        assert 0 < mid_stream["stream_median_gap_s"] <= mid_stream["stream_longest_gap_s"]
    mixed_lengths = report["served"]["mixed_prompt_lengths"]
    shortest, longest, same = mixed_lengths["prompt_tokens"]
    assert shortest < same < longest and mixed_lengths["mixed_vs_same"] > 0
    rates = mixed_lengths["tokens_per_s_mixed_lengths"] + mixed_lengths["tokens_per_s_same_length"]
    assert len(rates) == 4 and all(rate > 0 for rate in rates)
    assert report["machine"]["bandwidth_gbs"] > 0
    for row in report["speed"]:  # each fraction is against the bandwidth read beside it
        assert row["bandwidth_gbs"] > 0 and row["fraction_of_bound_b1"] > 0 and row["matmul_only_tok_s_b1"] > 0
        assert row["rounds_tok_s_b1"] > 0
        probes = row["bandwidth_probes_gbs"]  # the bound is the faster read of each round
        assert "torch_sum" in probes and row["bandwidth_gbs"] >= max(probes.values()) * (1 - 1e-9)
        assert abs(row["bound_tok_s_b1"] - row["bandwidth_gbs"] * 1e9 / row["bytes"]) < 1e-6 * row["bound_tok_s_b1"]
    assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
