"""`boomerang bench --out DIR [--quick]`: JSON report and PNG chart; thresholds reported, never asserted."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from services.bench.load import Arrival, arrivals, capacity, load_goals, run_load, summarize
from services.bench.measure import (
    bandwidth_bound,
    memory_and_switching,
    rss_bytes,
    speed_per_size,
)
from services.bench.peer import (
    PeerServer,
    Prompts,
    measure_server,
    peer_gguf,
    ratios,
    write_peer_report,
)
from services.bench.served import (
    ServerProcess,
    arrival_mid_batch,
    long_prompt,
    mixed_prompt_lengths,
    prompt_mid_stream,
    served_throughput,
)
from services.bench.soak import print_timeline, run_soak
from services.bench.structured_cost import structured_output_cost
from services.cpu.kernels.build import best_isa
from services.cpu.kernels.decoder_step import load_decoder_step
from services.cpu.threads import serving_threads
from services.engine.interface import DEFAULT_WEIGHTS, WEIGHT_FORMS
from services.family import load_family
from services.family.loading import load_tokenizer
from services.store import DEFAULT_PAIR, Manifest, resolve_teacher
from services.store.teacher_import import LOCK_FILE

SERVED_CONTEXT = 1024  # the served parts' context limit (prompt + completion)
LONG_PROMPT_MARGIN = 64  # tokens of the context a long prompt leaves free (it is re-encoded from text)
MID_STREAM_TOKENS = 160  # the stream a long prompt arrives beside: longer than that prompt's prefill
MIXED_PROMPT_MEAN_TOKENS = 256  # prompts of spread lengths average this many tokens
LOAD_MULTIPLES = (0.5, 1.0, 1.5, 2.0, 3.0)  # open-loop arrival rates, in units of the teacher's capacity
LOAD_TARGET_FACTOR = 4  # the latency target: this many times a lone teacher request's latency
GOALS = {
    "ratio_all_sizes_vs_pair": ("<=", 1.05),
    "switch_speedup_first_use": (">=", 1000),
    "min_speed_ratio": (">=", 0.95),
    "served_speedup_n16": (">=", 3.0),
    "served_speedup_n16_mixed_sizes": (">=", 3.0),
    "min_fraction_of_bound_b1": (">=", 0.8),
    "structured_output_cost_b1": ("<=", 0.15),
    # a stream's longest gap between tokens while a long prompt arrives, prefilled in chunks over prefilled whole
    "prompt_mid_stream_longest_gap": ("<=", 0.5),
    # 16 clients' throughput with prompts of spread lengths over that with all of their mean length
    "mixed_prompt_lengths_throughput": (">=", 0.8),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pair", help="models_store pair folder (default: the default pair)")
    parser.add_argument("--teacher")
    parser.add_argument("--student")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--quick", action="store_true", help="three sizes, short runs (under 2 minutes)")
    parser.add_argument("--no-served", action="store_true", help="skip the HTTP throughput part")
    parser.add_argument(
        "--soak",
        type=float,
        metavar="MINUTES",
        help="only a soak: mixed traffic on every size while the server's memory is sampled; "
        "exit 1 if memory grows or a request fails",
    )
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients of the soak")
    parser.add_argument("--context", type=int, help="soak: serve with this context limit and send prompts near it")
    parser.add_argument(
        "--weights",
        choices=WEIGHT_FORMS,
        default=DEFAULT_WEIGHTS,
        help="the weight form served (with --peer-llama-server: the peer gets the same bits)",
    )
    parser.add_argument(
        "--load",
        action="store_true",
        help="only the open-loop load run: the teacher alone (reject, unbounded queue) against the "
        "elastic family (auto + degrade) at 0.5-3x the teacher's capacity: load.json",
    )
    parser.add_argument(
        "--peer-llama-server",
        type=Path,
        metavar="PATH",
        help="only the side-by-side run against llama.cpp's llama-server at PATH (llama-quantize "
        "beside it) on the teacher's own GGUF: peer-WEIGHTS.json",
    )
    parser.add_argument(
        "--peer-gguf",
        type=Path,
        help="the GGUF the peer serves before requantizing (default: the one the teacher was imported from)",
    )


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (every figure is recorded beside it)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_vector_set() -> str | None:
    """The vector set the native kernels were built for (a figure holds for it), or None where torch serves."""
    return best_isa() if load_decoder_step() is not None else None


def _sizes(all_sizes: list[int], quick: bool) -> list[int]:
    return sorted({all_sizes[0], all_sizes[len(all_sizes) // 2], all_sizes[-1]}) if quick else all_sizes


def run(args: argparse.Namespace) -> int:
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.soak is not None:
        return _soak(args)
    if args.peer_llama_server is not None:
        return _peer(args)
    if args.load:
        return _load(args)
    started = time.perf_counter()
    rss0 = rss_bytes()
    load_start = time.perf_counter()
    family = load_family(args.teacher, args.student, pair=args.pair, device="cpu", weights=args.weights)
    load_seconds = time.perf_counter() - load_start
    sizes = _sizes(family.sizes, args.quick)
    memory, references = memory_and_switching(family, sizes, rss0, load_seconds)
    steps, batches = (8, [1, 8]) if args.quick else (32, [1, 8])
    speed = speed_per_size(family, references, batches, steps)
    del references
    bandwidth = bandwidth_bound(family, speed, rounds=3 if args.quick else 9)
    structured = structured_output_cost(family, rounds=2 if args.quick else 3)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "family": family.name,
        "machine": {
            "cpu": cpu_model(),
            "vector_set": kernel_vector_set(),
            "torch_threads": torch.get_num_threads(),
            "device": str(family.device),
            "dtype": str(family.dtype),
            "weights": args.weights,
            "bandwidth_gbs": bandwidth,
        },
        "settings": {"quick": args.quick, "decode_steps": steps, "batch_sizes": batches, "sizes": sizes},
        "memory": memory,
        "speed": speed,
        "structured_output": structured,
    }
    if not args.no_served:
        report["served"] = _served(args, family, sizes)
    report["goals"] = _goals(report)
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    _chart(report, out / "bench.png")
    print(json.dumps(report["goals"], indent=2))
    return 0


def _pair_args(args: argparse.Namespace) -> list[str]:
    if args.teacher:
        return ["--teacher", args.teacher, "--student", args.student]
    return ["--pair", args.pair] if args.pair else []


def _soak(args: argparse.Namespace) -> int:
    serve_args = ["--device", "cpu", *_pair_args(args)]
    prompt_words = (4, 60)
    if args.context:  # prompts near the limit, leaving room for the longest completion the soak asks for
        serve_args += ["--max-total-tokens", str(args.context)]
        prompt_words = (args.context * 2 // 3, args.context - 64)
    with ServerProcess(serve_args) as server:
        models = [card["id"] for card in server.model_cards()]
        report = run_soak(server.url, server.process.pid, models, args.soak, args.clients, prompt_words)
    report["machine"] = {"cpu": cpu_model(), "torch_threads": torch.get_num_threads()}
    report["date"] = datetime.now(UTC).isoformat(timespec="seconds")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"soak of {args.soak:g} min, {args.clients} clients, {len(models)} sizes, on {cpu_model()}:")
    print_timeline(report)
    return 0 if report["verdict"]["passed"] else 1


def _peer(args: argparse.Namespace) -> int:
    manifest = Manifest.read(Path(args.pair) if args.pair else DEFAULT_PAIR)
    teacher_dir = Path(args.teacher) if args.teacher else resolve_teacher(manifest)
    source = args.peer_gguf or Path(json.loads((teacher_dir / LOCK_FILE).read_text())["source"])
    out = Path(args.out)
    gguf = peer_gguf(args.peer_llama_server, source, args.weights, out)
    threads = serving_threads(None)[0]
    tokenizer = load_tokenizer(teacher_dir)
    prompts = Prompts(tokenizer)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "vector_set": kernel_vector_set(),
        "threads": threads,
        "weights": args.weights,
        "peer": {"server": str(args.peer_llama_server), "gguf": gguf.name},
    }
    with PeerServer(args.peer_llama_server, gguf, threads, SERVED_CONTEXT) as peer:
        report["theirs"] = measure_server(peer.url, "teacher", prompts, peer.process.pid)
    # the default batching window: a first token waits for it as a user's would
    with ServerProcess([*_served_args(args, batch_wait_ms=None), "--threads", str(threads)]) as server:
        by_layers = {card["num_layers"]: card["id"] for card in server.model_cards()}
        report["ours"] = {
            n: measure_server(server.url, by_layers[n], prompts, server.process.pid)
            for n in (max(by_layers), min(by_layers))
        }
    report["ours_over_theirs"] = {n: ratios(ours, report["theirs"]) for n, ours in report["ours"].items()}
    print(f"wrote {write_peer_report(report, out)}")
    print(json.dumps({"cpu": report["cpu"], "ours_over_theirs": report["ours_over_theirs"]}, indent=2))
    return 0


def _load(args: argparse.Namespace) -> int:
    seconds = 8 if args.quick else 15
    base = _served_args(args, batch_wait_ms=None)
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "multiples": list(LOAD_MULTIPLES),
        "seconds_per_load": seconds,
        "servers": {},
    }
    with ServerProcess(base) as server:
        cards = server.model_cards()
        by_layers = {card["num_layers"]: card["id"] for card in cards}
        family = next(card["root"] for card in cards if card["num_layers"] == min(by_layers))  # a size's family
        teacher, smallest = by_layers[max(by_layers)], by_layers[min(by_layers)]
        quality = {
            card["num_layers"]: card["quality"]["chat"]["answer_perplexity"]
            for card in cards
            if "chat" in card.get("quality", {})
        }
        unloaded = statistics.median(
            o.seconds
            for o in run_load(
                server.url,
                {"model": teacher},
                [Arrival(0.0, a.prompt, a.max_tokens) for a in arrivals(1e6, 1.0, seed=1)[:1]] * 5,
            )
        )
        rate = capacity(server.url, {"model": teacher})
        report.update(
            teacher_capacity_per_s=rate,
            speed_range=capacity(server.url, {"model": smallest}) / rate,
            target_s=LOAD_TARGET_FACTOR * unloaded,
            unloaded_teacher_s=unloaded,
        )
        report["servers"]["teacher_reject"] = _loads(server.url, {"model": teacher}, report, quality)
    with ServerProcess([*base, "--max-queue", "1000000"]) as server:
        report["servers"]["teacher_queue"] = _loads(server.url, {"model": teacher}, report, quality)
    target_ms = str(1000 * report["target_s"])
    with ServerProcess([*base, "--latency-target-ms", target_ms, "--overload-policy", "degrade"]) as server:
        body = {"model": f"{family}-auto", "max_latency_ms": float(target_ms)}
        report["servers"]["elastic"] = _loads(server.url, body, report, quality)
    report["goals"] = load_goals(report)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(report, indent=2) + "\n")
    for name, loads in report["servers"].items():
        for multiple, row in loads.items():
            print(
                json.dumps(
                    {
                        "server": name,
                        "load": float(multiple),
                        **{k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()},
                    }
                )
            )
    print(
        json.dumps(
            {
                "cpu": report["cpu"],
                "target_s": round(report["target_s"], 3),
                "speed_range": round(report["speed_range"], 2),
                **report["goals"],
            },
            indent=2,
        )
    )
    return 0


def _loads(url: str, body: dict, report: dict, quality: dict[int, float]) -> dict:
    """Every load multiple on one server: the same arrivals (seeded by the multiple) for every server."""
    results = {}
    for multiple in report["multiples"]:
        rate = multiple * report["teacher_capacity_per_s"]
        load = arrivals(rate, report["seconds_per_load"], seed=int(10 * multiple))
        results[str(multiple)] = summarize(
            run_load(url, body, load), report["seconds_per_load"], report["target_s"], quality
        )
    return results


def _served_args(args: argparse.Namespace, batch_wait_ms: float | None = 10) -> list[str]:
    # 16 rows at the default context would need more memory than a small machine has; the bench's requests
    # are short, so a shorter context costs them nothing
    wait = ["--batch-wait-ms", str(batch_wait_ms)] if batch_wait_ms is not None else []
    return [
        "--device",
        "cpu",
        "--max-concurrent",
        "16",
        "--max-batch-size",
        "16",
        *wait,
        "--max-total-tokens",
        str(SERVED_CONTEXT),
        "--weights",
        args.weights,
        *_pair_args(args),
    ]


def _served(args, family, sizes) -> dict:
    serve_args = _served_args(args)
    ids = [family.model_id(n) for n in sizes]
    requests, tokens = (16, 8) if args.quick else (48, 32)
    long_tokens, short_tokens = (64, 8) if args.quick else (256, 16)
    context = min(SERVED_CONTEXT, family.teacher.config.max_position_embeddings)
    prompt = long_prompt(family.tokenizer, context - LONG_PROMPT_MARGIN)  # to the largest size; the smallest streams
    with ServerProcess(serve_args) as server:
        served = served_throughput(server.url, ids, [1, 4, 16], requests, tokens)
        served["arrival_mid_batch"] = arrival_mid_batch(server.url, ids[-1], ids[0], long_tokens, short_tokens)
        served["prompt_mid_stream"] = prompt_mid_stream(server.url, ids[0], ids[-1], prompt, MID_STREAM_TOKENS)
        mixed_requests, mixed_tokens = (16, 32) if args.quick else (32, 64)  # answers as long as chats' short ones
        mean_tokens = min(MIXED_PROMPT_MEAN_TOKENS, (context - mixed_tokens - LONG_PROMPT_MARGIN) // 2)
        served["mixed_prompt_lengths"] = mixed_prompt_lengths(server.url, ids, family.tokenizer, mixed_requests,
                                                              mixed_tokens, mean_tokens)
    with ServerProcess([*serve_args, "--join-batches", "false"]) as server:  # the baseline: the short one waits
        served["arrival_mid_batch_without_joins"] = arrival_mid_batch(
            server.url, ids[-1], ids[0], long_tokens, short_tokens
        )
    with ServerProcess([*serve_args, "--prefill-chunk", "0"]) as server:  # the baseline: the stream waits it out
        served["prompt_mid_stream_whole_prefill"] = prompt_mid_stream(
            server.url, ids[0], ids[-1], prompt, MID_STREAM_TOKENS
        )
    return served


def _goals(report: dict) -> dict:
    speed = report["speed"]
    measured = {
        "ratio_all_sizes_vs_pair": report["memory"]["ratio_all_sizes_vs_pair"],
        "switch_speedup_first_use": report["memory"]["switch_speedup_first_use"],
        "min_speed_ratio": min(min(r["ratio_b1"], r["ratio_b8"]) for r in speed),
        "min_fraction_of_bound_b1": min(r["fraction_of_bound_b1"] for r in speed),
        "structured_output_cost_b1": report["structured_output"]["cost_fraction"],
    }
    if "served" in report:
        measured["served_speedup_n16"] = report["served"]["single_size"][-1]["speedup_vs_sequential"]
        measured["served_speedup_n16_mixed_sizes"] = report["served"]["mixed_sizes"][-1]["speedup_vs_sequential"]
        chunked, whole = (report["served"][key]["stream_longest_gap_s"]
                          for key in ("prompt_mid_stream", "prompt_mid_stream_whole_prefill"))
        measured["prompt_mid_stream_longest_gap"] = chunked / whole
        measured["mixed_prompt_lengths_throughput"] = report["served"]["mixed_prompt_lengths"]["mixed_vs_same"]
    result = {}
    for name, value in measured.items():
        op, target = GOALS[name]
        met = value <= target if op == "<=" else value >= target
        result[name] = {"measured": round(value, 4), "goal": f"{op} {target}", "met": met}
    return result


def _chart(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed = report["speed"]
    layers = [r["num_layers"] for r in speed]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for batch, style in ((1, "o-"), (8, "s-")):
        left.plot(layers, [r[f"tok_s_b{batch}"] for r in speed], style, label=f"serving batch, batch {batch}")
        left.plot(
            layers,
            [r[f"standalone_tok_s_b{batch}"] for r in speed],
            style.replace("-", "--"),
            label=f"standalone generate(), batch {batch}",
        )
    left.plot(layers, [r["rounds_tok_s_b1"] for r in speed], "x-", label="serving batch, batch 1, beside the bound")
    left.plot(layers, [r["bound_tok_s_b1"] for r in speed], "k:", label="bandwidth bound, batch 1")
    left.plot(layers, [r["matmul_only_tok_s_b1"] for r in speed], "k-.", label="weight matmuls alone, batch 1")
    left.set_xlabel("decoder layers")
    left.set_ylabel("decode tokens/s")
    left.set_yscale("log")
    left.legend(fontsize=8)
    left.set_title("greedy decode speed per size")
    memory = report["memory"]
    bars = {
        "teacher+student": memory["rss_teacher_plus_student_mb"],
        "all sizes assembled": memory["rss_all_sizes_assembled_mb"],
        f"{len(memory['deep_copied_sizes'])} deep copies": memory["rss_deep_copied_sizes_mb"],
    }
    right.bar(list(bars), list(bars.values()))
    right.set_ylabel("resident memory (MiB)")
    right.set_title("memory")
    fig.suptitle(f"{report['family']} on {report['machine']['cpu']} ({report['machine']['dtype']}), {report['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
