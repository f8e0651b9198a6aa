"""lm-evaluation-harness's `local-completions` log-likelihood throughput against our server, code trees side by
side.

Each tree (a git commit, checked out as a temporary worktree, or a folder) serves the same pair with
`boomerang serve`; lm-eval's own model class, given only `base_url` and `model` (its tokenizer found through
/tokenizer_info), scores (context, continuation) pairs cut from held-out text. The trees take turns, so drift of
the machine falls on each alike. Printed: requests/s per tree and batch size, the ratio to the first tree, and
the largest difference of any log-likelihood from the first tree's.

Tasks (`--task`): `pairs`, every context once with its own continuation; `letters`, multiple choice as MMLU asks
it, each context with the four one-token answers " A" to " D"; `endings`, multiple choice as HellaSwag asks it,
each context with four continuations of different lengths (the true one and three from elsewhere).

    nice -n 5 .venv/bin/python tools/lmeval_throughput.py --tree before=3b3e3db^ --tree head=.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.bench.served import ServerProcess  # noqa: E402
from services.corpora import held_out_play  # noqa: E402

DEFAULT_PAIR = ROOT / "models_store" / "smollm2-135m-boomerang"


class TreeServer(ServerProcess):
    """`boomerang serve` run from another checkout: its own code, this checkout's converted models."""

    def __init__(self, tree: Path, serve_args: list[str]):
        super().__init__(serve_args)
        self.tree = tree

    def _popen(self, log) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(self.tree),
               "BOOMERANG_CACHE_DIR": os.environ.get("BOOMERANG_CACHE_DIR", str(ROOT / "models_store" / ".cache"))}
        return subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=log, env=env, cwd=self.tree)


def text_pairs(count: int) -> list[tuple[str, str]]:
    """(context, continuation) pairs from consecutive passages of the held-out play: contexts of 20 to 80 words
    (lm-eval's batches mix lengths), continuations of 3 to 8."""
    words = held_out_play().split()[2000:]  # past the front matter
    pairs, start = [], 0
    for i in range(count):
        context_words, continuation_words = 20 + (i * 13) % 61, 3 + i % 6
        context = " ".join(words[start:start + context_words])
        continuation = " " + " ".join(words[start + context_words:start + context_words + continuation_words])
        pairs.append((context, continuation))
        start += context_words + continuation_words
    return pairs


CHOICES = 4
LETTERS = (" A", " B", " C", " D")


def multiple_choice(count: int, task: str) -> list[tuple[str, str]]:
    """`count` requests: each context of `text_pairs` asked with `CHOICES` continuations, in lm-eval's way."""
    contexts = text_pairs(count // CHOICES + CHOICES)
    requests = []
    for i, (context, truth) in enumerate(contexts[:count // CHOICES]):
        if task == "letters":
            requests += [(context + "\nAnswer:", letter) for letter in LETTERS]
        else:
            others = [contexts[(i + k) % len(contexts)][1] for k in range(1, CHOICES)]
            requests += [(context, ending) for ending in (truth, *others)]
    return requests


def task_requests(task: str, count: int) -> list[tuple[str, str]]:
    return text_pairs(count) if task == "pairs" else multiple_choice(count, task)


def lm_eval_model(url: str, model: str, batch_size: int):
    from lm_eval.api.registry import get_model

    return get_model("local-completions")(base_url=url + "/v1/completions", model=model, batch_size=batch_size)


def timed_run(lm, pairs: list[tuple[str, str]]) -> tuple[float, list[tuple[float, bool]]]:
    """Seconds for lm-eval to score every pair (its requests only: the pairs are tokenized first), and results."""
    from lm_eval.api.instance import Instance

    instances = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    tokenized = [((ctx, cont), *lm._encode_pair(ctx, cont)) for ctx, cont in (i.args for i in instances)]
    start = time.perf_counter()
    results = lm._loglikelihood_tokens(tokenized, disable_tqdm=True)
    return time.perf_counter() - start, results


def checkout(label: str, spec: str, scratch: Path) -> tuple[Path, bool]:
    """A folder to serve from: `spec` itself if it is one, else a detached worktree of that commit."""
    if Path(spec).is_dir():
        return Path(spec).resolve(), False
    tree = scratch / label
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), spec], check=True,
                   capture_output=True)
    return tree, True


def measure(trees: dict[str, Path], args) -> dict:
    pairs = task_requests(args.task, args.pairs)
    args.pairs = len(pairs)  # what is sent: a whole number of questions
    serve_args = ["--pair", str(args.pair)] + (["--threads", str(args.threads)] if args.threads else [])
    servers = {label: TreeServer(tree, serve_args) for label, tree in trees.items()}
    times: dict[tuple[str, int], list[float]] = {}
    results: dict[tuple[str, int], list] = {}
    for server in servers.values():
        server.__enter__()
    try:
        model = next(iter(servers.values())).model_cards()[-1]["id"]  # the family id: the teacher
        # trees next to each other within a batch size: what the machine does meanwhile falls on each alike
        models = {(label, batch): lm_eval_model(server.url, model, batch) for batch in args.batch_sizes
                  for label, server in servers.items()}
        for lm in models.values():
            timed_run(lm, pairs[:4])  # warm-up: kernels, first requests
        for _ in range(args.repeats):
            for key, lm in models.items():
                seconds, results[key] = timed_run(lm, pairs)
                times.setdefault(key, []).append(seconds)
                print(f"{key[0]} batch {key[1]}: {args.pairs / seconds:.2f} requests/s", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.__exit__()
    return summary(trees, times, results, args, model)


def summary(trees, times, results, args, model) -> dict:
    first = next(iter(trees))
    rows = []
    for (label, batch), seconds in times.items():
        median = statistics.median(seconds)
        base = statistics.median(times[(first, batch)])
        diff = max(abs(a[0] - b[0]) for a, b in zip(results[(label, batch)], results[(first, batch)]))
        greedy_same = all(a[1] == b[1] for a, b in zip(results[(label, batch)], results[(first, batch)]))
        rows.append({"tree": label, "batch_size": batch, "requests_per_s": args.pairs / median,
                     "ratio_to_" + first: base / median, "seconds": seconds,
                     "max_abs_loglik_diff": diff, "is_greedy_same": greedy_same})
    return {"model": model, "task": args.task, "pairs": args.pairs, "repeats": args.repeats, "cpu": cpu_model(),
            "threads": args.threads or "default", "load_average": os.getloadavg(),
            "trees": {k: str(v) for k, v in trees.items()}, "rows": rows}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    return platform.processor()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", required=True, metavar="LABEL=COMMIT_OR_FOLDER",
                        help="a code tree to serve from; the first is the baseline of the ratios")
    parser.add_argument("--pair", type=Path, default=DEFAULT_PAIR, help="the pair every tree serves")
    parser.add_argument("--pairs", type=int, default=64, help="(context, continuation) pairs per run")
    parser.add_argument("--task", choices=("pairs", "letters", "endings"), default="pairs",
                        help="what the requests look like (see above)")
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16],
                        help="lm-eval's batch_size (prompts per request), comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tree and batch size (median taken)")
    parser.add_argument("--threads", type=int, help="each server's torch threads (default: the server's own)")
    parser.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tokenizer comes from the server, never the Hub
    scratch = Path(tempfile.mkdtemp(prefix="lmeval-trees-"))
    trees, made = {}, []
    try:
        for spec in args.tree:
            label, _, where = spec.partition("=")
            trees[label], is_new = checkout(label, where, scratch)
            made += [trees[label]] if is_new else []
        figures = measure(trees, args)
    finally:
        for tree in made:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
