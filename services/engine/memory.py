"""What the server may hold at most: the weights plus what the limits allow, as a formula, and the check at start.

KV bytes per token per row = 2 (keys, values) x num_hidden_layers x num_key_value_heads x head_dim x dtype bytes,
for the largest size (the teacher: every layer). With C = the context limit (prompt + completion) and
R = max_batch_size:
- a batch holds at most R rows of at most 2C + G positions each (rows are right-aligned at the longest one's
  context, so a short row's padding can reach C more; capacities come in granules of G = 64 positions), and a
  join holds at once the old buffers, the newcomers' and the new ones (at most C + G positions each);
- batches that mix sizes are one batch: KV <= R x (4C + 3G) x bytes per token;
- with --mix-sizes false each size has its own batch, all of them together at most max_concurrent rows:
  KV <= max_concurrent x (4C + 3G) x bytes per token.
One piece of work runs besides the KV at a time, the larger of a prefill of R prompts of C tokens (attention mask
R x C^2 bytes, activations R x C x (4 hidden_size + 3 intermediate_size) x dtype bytes) and the head of a scoring
(up to R prompts per forward, whose forward is such a prefill: the last hidden states of all of them,
R x C x hidden_size, while one prompt's logits and one temporary of their size, 2 x C x vocab_size, are made;
x dtype bytes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from services.errors import MemoryLimitError
from services.family.architectures import kv_shape
from services.family.kv_buffer import MIN_CAPACITY

GIB = 2 ** 30


def kv_bytes_per_token(config, item_bytes: int) -> int:
    """Keys and values of one position of one row through every layer of the teacher."""
    kv_heads, head_dim = kv_shape(config)
    return 2 * config.num_hidden_layers * kv_heads * head_dim * item_bytes


@dataclass(frozen=True)
class MemoryBound:
    weights_bytes: int
    kv_bytes: int  # the KV pool's budget
    work_bytes: int  # one prefill or one scoring
    kv_bytes_per_token: int
    context: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.work_bytes

    def as_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def memory_bound(config, item_bytes: int, weights_bytes: int, context: int, max_batch_size: int,
                 max_concurrent: int, mixed: bool) -> MemoryBound:
    """The most the limits let the server hold (see the module's formula)."""
    per_token = kv_bytes_per_token(config, item_bytes)
    rows = max_batch_size if mixed else max_concurrent
    kv = rows * (4 * context + 3 * MIN_CAPACITY) * per_token
    prefill = max_batch_size * context * (context + (4 * config.hidden_size + 3 * config.intermediate_size)
                                          * item_bytes)
    scoring = (max_batch_size * config.hidden_size + 2 * config.vocab_size) * context * item_bytes
    return MemoryBound(weights_bytes, kv, max(prefill, scoring), per_token, context)


def available_bytes() -> int | None:
    """Memory this process may still take: the smaller of MemAvailable and the cgroup's room, if known."""
    candidates = []
    try:
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        candidates.append(int(fields["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            text = limit.read().strip()
            if text != "max":
                candidates.append(int(text) - int(used.read()))
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def check_fits(bound: MemoryBound, available: int | None) -> None:
    """Refuses limits whose worst case exceeds the memory left (the weights are loaded already)."""
    needed = bound.total_bytes - bound.weights_bytes
    if available is not None and needed > available:
        raise MemoryLimitError(
            f"the limits need up to {needed / GIB:.1f} GiB beyond the weights (KV {bound.kv_bytes / GIB:.1f} GiB at "
            f"{bound.context} tokens of context, {bound.work_bytes / GIB:.1f} GiB for one prefill or scoring) but "
            f"{available / GIB:.1f} GiB is available; lower --max-total-tokens or --max-batch-size")
