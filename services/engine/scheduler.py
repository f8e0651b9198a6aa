"""The worker thread: groups waiting requests by size into batches and advances all batches fairly.

Each loop admits new requests (at once on an idle engine that takes joins, else those of one key that
arrived within a short window; the key is a size, or "mixed" for batches that mix sizes): they join the
key's running batch between two steps where it takes joins and has room (`FamilyBatch.joinable`,
`--join-batches`), else form a batch of their own once none of the key runs. Then it runs one decode step
of every active batch in turn, so sizes interleave step by step and none starves. Where batches take joins,
requests are prefilled in batches of similar prompt lengths (`prompt_groups`). While rows are decoding, the
prefills between two of their steps take at most `prefill_chunk` prompt tokens (`EngineLimits`; rows x
positions): a longer prompt is prefilled a chunk per loop, so it delays the running rows' next tokens by one
chunk, not by its whole prefill; meanwhile requests short enough for one pass are admitted beside it
(prefilled at once, within what is left of those tokens, the chunk keeping at least half of them).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from services.engine.batch import RowBatch, Sequence
from services.engine.interface import EngineLimits
from services.engine.prompt_groups import similar_prompts

log = logging.getLogger(__name__)
BatchKey = int | str  # a size's number of layers, or "mixed" for batches that mix sizes

# A burst of requests (clients answered by the same step send their next ones together) reaches the
# engine over tens of milliseconds; a fixed window from the first of them split it into a small batch
# and a remainder that waited for that batch to finish. The window now restarts with each arrival,
# capped at this many windows after the oldest request.
MAX_WINDOWS = 8


@dataclass(frozen=True)
class Housekeeping:
    """Work run between steps at most every `every_s` seconds (handing freed heap memory back)."""

    run: Callable[[], object]
    every_s: float = 5.0


@dataclass
class _Job:
    """A piece of torch work that is not a decode (scoring): run once, between decode steps."""

    run: Callable[[], None]


@dataclass
class _Prefill:
    """Newcomers being prefilled (in one pass, or a chunk per loop), and the time that has taken so far."""

    key: BatchKey
    batch: RowBatch
    seconds: float = 0.0


class Scheduler:
    def __init__(self, make_batch: Callable[[BatchKey, list[Sequence]], RowBatch], limits: EngineLimits,
                 on_batch: Callable[[BatchKey, int], None] | None = None, housekeeping: Housekeeping | None = None,
                 on_step: Callable[[list[int], float], None] | None = None,
                 on_prefill: Callable[[int, float], None] | None = None):
        self.make_batch, self.limits, self.on_batch, self.on_step = make_batch, limits, on_batch, on_step
        self.on_prefill = on_prefill
        self.housekeeping, self.last_housekeeping = housekeeping, time.monotonic()
        self.waiting: OrderedDict[BatchKey, deque[tuple[float, Sequence]]] = OrderedDict()
        self.jobs: deque[_Job] = deque()
        self.active: list[tuple[BatchKey, RowBatch]] = []
        self.prefilling: _Prefill | None = None  # a prompt too long for one pass beside running rows
        self._budget = math.inf  # prompt tokens that may still be prefilled before the running rows' next steps
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="boomerang-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout=10)

    def submit(self, key: BatchKey, seq: Sequence) -> None:
        with self.wake:
            self.waiting.setdefault(key, deque()).append((time.monotonic(), seq))
            self.wake.notify()

    def submit_job(self, run: Callable[[], None]) -> None:
        with self.wake:
            self.jobs.append(_Job(run))
            self.wake.notify()

    @property
    def num_waiting(self) -> int:
        with self.wake:
            return sum(len(q) for q in self.waiting.values())

    def _batches(self) -> list[RowBatch]:
        """The running batches and the one being prefilled, if any (read from other threads too)."""
        prefill = self.prefilling
        return [batch for _, batch in list(self.active)] + ([prefill.batch] if prefill is not None else [])

    @property
    def num_running(self) -> int:
        return sum(sum(not s.done for s in batch.sequences) for batch in self._batches())

    def running_layers(self) -> list[int]:
        """The size of every running sequence (being prefilled, or decoding)."""
        return [s.num_layers for batch in self._batches() for s in batch.sequences
                if not s.done and s.num_layers is not None]

    def _decoding(self) -> bool:
        """Whether some running row waits for its next step."""
        return any(not s.done for _, batch in self.active for s in batch.sequences)

    # -- worker ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.wake:
                while not (self.stopping or self.jobs or self.active or self.prefilling
                           or any(self.waiting.values())):
                    # idle: still wake for housekeeping, so memory freed by the last batch goes back
                    if not self.wake.wait(self.housekeeping.every_s if self.housekeeping else None):
                        break
                if self.stopping:
                    return
                jobs, self.jobs = list(self.jobs), deque()
            for job in jobs:
                job.run()
            self._loop()
            self._keep_house()

    def _loop(self) -> None:
        """Admits what may start, advances the prefill in flight, and steps every running batch."""
        self._budget = self.limits.prefill_chunk or math.inf
        self._admit()
        self._prefill_next()
        self._step_all()

    def _keep_house(self) -> None:
        if self.housekeeping is None or time.monotonic() - self.last_housekeeping < self.housekeeping.every_s:
            return
        self.housekeeping.run()
        self.last_housekeeping = time.monotonic()

    def _joinable(self, key: BatchKey) -> RowBatch | None:
        """The key's running batch that new requests may join between steps, if any."""
        return next((batch for k, batch in self.active if k == key and batch.joinable and not batch.done), None)

    def _room(self, key: BatchKey) -> int:
        """How many requests of `key` may start now: a batch's worth, or the free rows of the batch they
        would join."""
        batch, prefill = self._joinable(key), self.prefilling
        live = sum(not seq.done for seq in batch.sequences) if batch is not None else 0
        if prefill is not None and prefill.key == key:  # its rows join the same batch once prefilled
            live += sum(not seq.done for seq in prefill.batch.sequences)
        return self.limits.max_batch_size - live

    def _ready(self, key: BatchKey, queue: deque, now: float) -> bool:
        """Waiting requests of a key start when they would fill what room there is, at once on an idle
        engine whose batches take joins, or when the batching window has passed since the newest one
        arrived (a burst gathers while it keeps coming, up to `MAX_WINDOWS` windows after the oldest) and
        the key has no batch running or one they may join; else they wait for its next batch."""
        room = self._room(key)
        if room <= 0:
            return False
        if len(queue) >= room or (self.limits.join_batches and not self.active):
            return True  # an idle engine starts at once: the rest of a burst joins between steps
        running = any(k == key and not batch.done for k, batch in self.active)
        if running and self._joinable(key) is None:
            return False
        window = self.limits.batch_wait_ms / 1000
        return now - queue[-1][0] >= window or now - queue[0][0] >= MAX_WINDOWS * window

    def _take(self) -> tuple[int, list[Sequence]] | None:
        """The next size, in round-robin order, whose waiting requests are ready to form a batch."""
        free = self.limits.max_concurrent - self.num_running
        now = time.monotonic()
        with self.wake:
            for key, queue in list(self.waiting.items()):
                while queue and queue[0][1].cancelled.is_set():
                    queue.popleft()
                if not queue:
                    del self.waiting[key]
                    continue
                if free <= 0 or not self._ready(key, queue, now):
                    continue
                picked = self._pick(queue, min(len(queue), self._room(key), free))
                if not picked:
                    continue
                taken = [queue[index][1] for index in picked]
                for index in reversed(picked):
                    del queue[index]
                if picked[0] == 0:  # fairness: the key goes to the back, unless its oldest was passed (it goes first)
                    self.waiting.move_to_end(key)
                return key, taken
        return None

    def _pick(self, queue: deque, count: int) -> list[int]:
        """Which of a key's waiting requests form its next batch: of similar prompt lengths where batches take
        joins (the others join it soon after), else the oldest `count` (the others would wait for its end)."""
        if not self.limits.join_batches:
            return list(range(count)) if self.prefilling is None else []
        return similar_prompts([len(seq.prompt_ids) for _, seq in queue], count, self._one_pass_tokens())

    def _one_pass_tokens(self) -> float:
        """The most prompt tokens a new batch may have: beside a chunked prefill, what one pass may take now;
        else any (a long one becomes the chunked prefill)."""
        return math.inf if self.prefilling is None else self._budget

    def _admit(self) -> None:
        while (taken := self._take()) is not None:
            key, sequences = taken
            batch = self.make_batch(key, sequences)
            if self.on_batch:
                self.on_batch(key, len(sequences))
            start = time.perf_counter()
            if not self._guard(sequences, batch.start_prefill):
                batch.release()
                continue
            prefill = _Prefill(key, batch, time.perf_counter() - start)
            if self.prefilling is None and self._decoding() and batch.prompt_left * len(sequences) > self._budget:
                self.prefilling = prefill  # a chunk per loop, from `_prefill_next`
            else:
                self._prefill(prefill)
        if not self.active and any(self.waiting.values()):
            time.sleep(max(self.limits.batch_wait_ms / 2000, 0.0005))  # let the batching window fill

    def _prefill_next(self) -> None:
        """Advances the prefill in flight by what is left of this loop's prompt tokens, but at least half a
        chunk (short prompts admitted beside it must not stall it), or whole where no row waits for a step;
        clears it once its rows are placed."""
        prefill = self.prefilling
        if prefill is None:
            return
        tokens = max(self._budget, self.limits.prefill_chunk // 2) if self._decoding() else math.inf
        if not self._prefill(prefill, tokens):
            self.prefilling = None

    def _prefill(self, prefill: _Prefill, tokens: float = math.inf) -> bool:
        """Prefills `prefill` whole, or as many positions as `tokens` (over its rows) allow; what it takes comes
        off this loop's prompt tokens while rows decode. Once done, its rows join their key's running batch or
        start one. True while it is still in flight."""
        batch, done = prefill.batch, []
        if not batch.done:  # else every request was cancelled: nothing to finish
            rows = len(batch.sequences)
            left = batch.prompt_left * rows
            positions = None if left <= tokens else max(1, int(tokens) // rows)
            if self._decoding():
                self._budget -= left if positions is None else positions * rows
            start = time.perf_counter()
            self._guard(batch.sequences, lambda: done.append(batch.prefill_chunk(positions)))
            prefill.seconds += time.perf_counter() - start
        if done == [False]:
            return True
        if done and self.on_prefill is not None:
            layer_tokens = sum(len(seq.prompt_ids) * (seq.num_layers or 0) for seq in batch.sequences)
            self.on_prefill(layer_tokens, prefill.seconds)
        target = self._joinable(prefill.key)
        if not done or batch.done:  # cancelled, failed (its requests have the error), or answered in one token
            batch.release()
        elif target is None:
            self.active.append((prefill.key, batch))
        else:
            self._guard([*target.sequences, *batch.sequences], lambda: self._join(target, batch))
        return False  # placed before it stops being in flight: its rows count as running throughout

    @staticmethod
    def _join(target: RowBatch, newcomers: RowBatch) -> None:
        try:
            target.join(newcomers)
        except BaseException:
            newcomers.release()
            raise

    def _step_all(self) -> None:
        for entry in list(self.active):
            _, batch = entry
            if not batch.done:
                self._timed_step(batch)
            if batch.done and entry in self.active:
                self.active.remove(entry)
                batch.release()

    def _timed_step(self, batch: RowBatch) -> None:
        rows = [s.num_layers for s in batch.sequences if not s.done and s.num_layers is not None]
        start = time.perf_counter()
        self._guard(batch.sequences, batch.step)
        if self.on_step is not None:
            self.on_step(rows, time.perf_counter() - start)

    def _guard(self, sequences: list[Sequence], work: Callable[[], object]) -> bool:
        """Run torch work; a failure ends only the sequences involved, with the error delivered to them.
        True when it ran."""
        try:
            work()
            return True
        except Exception as error:  # noqa: BLE001 - delivered to the waiting callers, logged here
            log.exception("engine step failed")
            for seq in sequences:
                if not seq.done:
                    seq.finished = True
                    seq.emit(error)
            for _, batch in self.active:
                if batch.done:
                    batch.release()
            self.active = [(n, b) for n, b in self.active if not b.done]
            return False
