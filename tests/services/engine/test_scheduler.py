"""Batch formation: a burst gathers while it keeps arriving, up to a cap; a running size waits for a full
batch, or new requests join it where it takes joins."""

import time
from collections import deque
from types import SimpleNamespace

from services.engine.interface import EngineLimits
from services.engine.scheduler import MAX_WINDOWS, Housekeeping, Scheduler

WINDOW = 0.010
PREFILL_CHUNK = EngineLimits().prefill_chunk


def _scheduler(join_batches: bool = True) -> Scheduler:
    limits = EngineLimits(max_batch_size=16, batch_wait_ms=WINDOW * 1000, join_batches=join_batches)
    return Scheduler(make_batch=lambda key, seqs: None, limits=limits)


def _queue(arrivals: list[float]) -> deque:
    return deque((t, object()) for t in arrivals)


def test_a_burst_gathers_until_a_window_passes_without_arrivals():
    scheduler, burst = _scheduler(join_batches=False), _queue([0.0, 0.008, 0.016])
    assert not scheduler._ready(23, burst, now=0.020)  # the oldest waited two windows, the newest not one
    assert scheduler._ready(23, burst, now=0.027)


def test_a_steady_stream_is_cut_after_the_cap():
    scheduler, stream = _scheduler(join_batches=False), _queue([0.005 * i for i in range(15)])
    assert not scheduler._ready(23, stream, now=0.072)
    assert scheduler._ready(23, stream, now=MAX_WINDOWS * WINDOW + 0.001)


def _running(joinable: bool, live: int, finished: int = 0) -> SimpleNamespace:
    rows = [SimpleNamespace(done=False)] * live + [SimpleNamespace(done=True)] * finished
    return SimpleNamespace(joinable=joinable, done=False, sequences=rows)


def test_an_idle_engine_that_takes_joins_starts_a_request_at_once():
    """The batching window would only delay a lone request's first token: later arrivals join its batch."""
    assert _scheduler()._ready("mixed", _queue([0.0]), now=0.0)
    assert not _scheduler(join_batches=False)._ready("mixed", _queue([0.0]), now=0.0)


def test_a_burst_on_an_idle_engine_is_one_start_and_one_join():
    """The first request starts alone; the rest gather while its batch runs and join it together."""
    scheduler = _scheduler()
    assert scheduler._ready("mixed", _queue([0.0]), now=0.0)
    scheduler.active.append(("mixed", _running(joinable=True, live=1)))
    rest = _queue([0.001, 0.004, 0.009])
    assert not scheduler._ready("mixed", rest, now=0.012)  # still arriving
    assert scheduler._ready("mixed", rest, now=0.020)  # one join of all three


def test_a_size_with_a_running_batch_waits_unless_the_batch_would_be_full():
    scheduler = _scheduler()
    scheduler.active.append((23, _running(joinable=False, live=3)))
    assert not scheduler._ready(23, _queue([0.0]), now=1.0)
    assert scheduler._ready(23, _queue([0.0] * 16), now=0.0)
    assert scheduler._ready(17, _queue([0.0]), now=1.0)  # another size is not held back


def test_requests_join_a_running_batch_that_takes_joins_as_far_as_it_has_room():
    scheduler = _scheduler()
    scheduler.active.append(("mixed", _running(joinable=True, live=10, finished=4)))  # finished rows leave
    assert scheduler._room("mixed") == 6
    assert not scheduler._ready("mixed", _queue([0.0, 0.008]), now=0.012)  # the burst is still arriving
    assert scheduler._ready("mixed", _queue([0.0, 0.008]), now=0.019)  # it joins; no need to wait
    assert scheduler._ready("mixed", _queue([0.0] * 6), now=0.0)  # fills the room at once
    scheduler.active[0] = ("mixed", _running(joinable=True, live=16))
    assert not scheduler._ready("mixed", _queue([0.0] * 20), now=1.0)  # full: they wait


def test_housekeeping_runs_between_steps_at_most_once_a_period(monkeypatch):
    runs, clock = [], [100.0]
    monkeypatch.setattr("services.engine.scheduler.time.monotonic", lambda: clock[0])
    scheduler = Scheduler(make_batch=lambda key, seqs: None, limits=EngineLimits(),
                          housekeeping=Housekeeping(lambda: runs.append(clock[0]), every_s=5.0))
    for now in (101.0, 104.9, 105.0, 106.0, 109.9, 110.0):
        clock[0] = now
        scheduler._keep_house()
    assert runs == [105.0, 110.0]


def test_releases_every_batch_that_leaves():
    released = []
    batch = SimpleNamespace(done=True, sequences=[], release=lambda: released.append("done"))
    scheduler = _scheduler()
    scheduler.active.append((23, batch))
    scheduler._step_all()
    assert released == ["done"] and not scheduler.active


class _Seq:
    """A request as the scheduler sees it: done once finished (its answer, or an error) or cancelled."""

    def __init__(self, log: list, prompt: int):
        self.finished, self.num_layers, self.prompt_ids, self.emit = False, 23, [1] * prompt, log.append
        self.cancelled = SimpleNamespace(is_set=lambda: False)

    @property
    def done(self) -> bool:
        return self.finished


class _Rows:
    """A batch standing in for `FamilyBatch`: its prompts take `prompt` positions; every call is logged;
    `answered`: its rows finish with their first token."""

    joinable = True

    def __init__(self, log: list, name: str, rows: int, prompt: int, fail_at_chunk: int | None = None,
                 answered: bool = False):
        self.log, self.name, self.prompt_left, self.fail_at_chunk = log, name, prompt, fail_at_chunk
        self.sequences, self.chunks, self.answered = [_Seq(log, prompt) for _ in range(rows)], 0, answered
        self.steps, self.finish_after_steps = 0, None  # steps taken; after how many its rows finish

    @property
    def done(self) -> bool:
        return all(seq.done for seq in self.sequences)

    def start_prefill(self) -> None:
        self.log.append(("start", self.name))

    def prefill_chunk(self, positions: int | None) -> bool:
        self.chunks += 1
        if self.chunks == self.fail_at_chunk:
            raise RuntimeError("chunk failed")
        self.log.append(("chunk", self.name, positions))
        self.prompt_left -= self.prompt_left if positions is None else min(positions, self.prompt_left)
        if self.prompt_left == 0 and self.answered:
            for seq in self.sequences:
                seq.finished = True
        return self.prompt_left == 0

    def step(self) -> None:
        self.log.append(("step", self.name))
        self.steps += 1
        if self.steps == self.finish_after_steps:
            for seq in self.sequences:
                seq.finished = True

    def join(self, newcomers) -> None:
        self.log.append(("join", self.name, newcomers.name))
        self.sequences += newcomers.sequences

    def release(self) -> None:
        self.log.append(("release", self.name))


def _with_running(log: list, *newcomers: _Rows, prefill_chunk: int = PREFILL_CHUNK,
                  keys: tuple[str, ...] | None = None) -> tuple[Scheduler, _Rows]:
    """A scheduler whose running batch ("mixed") decodes 2 rows, with `newcomers` waiting in order (under
    `keys`, one each; default "mixed": they join it). Its batches are the `_Rows` their requests belong to."""
    running = _Rows(log, "running", rows=2, prompt=0)
    limits = EngineLimits(max_batch_size=16, batch_wait_ms=0, prefill_chunk=prefill_chunk)
    scheduler = Scheduler(make_batch=lambda key, seqs: seqs[0].rows, limits=limits)
    scheduler.active.append(("mixed", running))
    for newcomer, key in zip(newcomers, keys or ["mixed"] * len(newcomers)):
        _submit(scheduler, newcomer, key)
    return scheduler, running


def _submit(scheduler: Scheduler, rows: _Rows, key: str = "mixed") -> None:
    for seq in rows.sequences:
        seq.rows = rows  # the batch the fake `make_batch` hands back for it
        scheduler.submit(key, seq)


def _loop(scheduler: Scheduler, times: int) -> None:
    for _ in range(times):  # the worker's loop, without its thread
        scheduler._loop()


def test_a_long_prompt_is_prefilled_a_chunk_between_steps_of_the_running_rows():
    log = []
    scheduler, running = _with_running(log, _Rows(log, "new", rows=1, prompt=2 * PREFILL_CHUNK + 10))
    _loop(scheduler, 1)
    assert scheduler.num_running == 3  # the newcomer counts while its prompt is prefilled
    _loop(scheduler, 3)
    assert log[:8] == [("start", "new"), ("chunk", "new", PREFILL_CHUNK), ("step", "running"),
                       ("chunk", "new", PREFILL_CHUNK), ("step", "running"),
                       ("chunk", "new", None), ("join", "running", "new"), ("step", "running")]  # its last 10
    assert scheduler.prefilling is None and len(running.sequences) == 3


def test_one_chunk_of_a_long_prompt_per_loop_and_short_prompts_whole_beside_it():
    log = []
    first = _Rows(log, "first", rows=1, prompt=PREFILL_CHUNK + 100)
    third = _Rows(log, "third", rows=2, prompt=PREFILL_CHUNK // 2)  # exactly a chunk's tokens: one pass
    scheduler, _ = _with_running(log, first, third, keys=("first", "third"))
    _loop(scheduler, 1)
    second = _Rows(log, "second", rows=1, prompt=PREFILL_CHUNK + 10)
    _submit(scheduler, second, "second")
    _loop(scheduler, 3)
    chunks = [entry[1:] for entry in log if isinstance(entry, tuple) and entry[0] == "chunk"]
    assert chunks == [("third", None),  # loop 1: the short one in one pass, a chunk's tokens
                      ("first", PREFILL_CHUNK // 2),  # then the long one's chunk: half a chunk at least
                      ("first", None),  # loop 2: its last positions; the second waits, too long to pass beside it
                      ("second", PREFILL_CHUNK),  # loop 3: a chunk
                      ("second", None)]  # loop 4: its last 10 positions
    steps = [i for i, entry in enumerate(log) if entry == ("step", "running")]
    assert len(steps) == 4 and steps[1] < log.index(("start", "second")) < steps[2]
    assert [key for key, _ in scheduler.active] == ["mixed", "third", "first", "second"]


def test_beside_a_chunked_prefill_short_requests_take_only_the_room_its_rows_leave():
    log = []
    long = _Rows(log, "long", rows=1, prompt=3 * PREFILL_CHUNK)
    scheduler, running = _with_running(log, long)
    scheduler.limits = EngineLimits(max_batch_size=4, batch_wait_ms=0)  # 2 running + 1 being prefilled: room 1
    _loop(scheduler, 1)
    shorts = [_Rows(log, f"short{i}", rows=1, prompt=10) for i in range(2)]
    for short in shorts:
        _submit(scheduler, short)
    _loop(scheduler, 1)
    assert log[2:7] == [("step", "running"), ("start", "short0"), ("chunk", "short0", None),
                        ("join", "running", "short0"), ("chunk", "long", PREFILL_CHUNK - 10)]  # what is left
    assert scheduler.num_waiting == 1 and scheduler.prefilling.batch is long  # the other short one waits
    scheduler.limits = EngineLimits(max_batch_size=16, batch_wait_ms=0)
    _submit(scheduler, _Rows(log, "long2", rows=1, prompt=PREFILL_CHUNK + 1))  # waits for the chunked prefill
    _loop(scheduler, 1)
    assert ("start", "short1") in log and ("start", "long2") not in log


def test_an_idle_engine_prefills_a_long_prompt_in_one_pass():
    log = []
    newcomer = _Rows(log, "new", rows=1, prompt=2 * PREFILL_CHUNK + 10)
    scheduler, _ = _with_running(log, newcomer)
    scheduler.active.clear()  # no running row waits for a step
    _loop(scheduler, 1)
    assert log == [("start", "new"), ("chunk", "new", None), ("step", "new")]
    assert scheduler.active == [("mixed", newcomer)]


def test_with_chunks_off_a_long_prompt_is_prefilled_in_one_pass_beside_running_rows():
    log = []
    scheduler, _ = _with_running(log, _Rows(log, "new", rows=1, prompt=2 * PREFILL_CHUNK + 10), prefill_chunk=0)
    _loop(scheduler, 1)
    assert log == [("start", "new"), ("chunk", "new", None), ("join", "running", "new"), ("step", "running")]


def test_a_prefill_whose_requests_are_cancelled_or_fail_ends_and_the_running_rows_go_on():
    log = []
    newcomer = _Rows(log, "new", rows=1, prompt=3 * PREFILL_CHUNK)
    scheduler, running = _with_running(log, newcomer)
    _loop(scheduler, 1)
    newcomer.sequences[0].finished = True  # the client went away
    _loop(scheduler, 1)
    assert ("release", "new") in log and scheduler.prefilling is None and len(running.sequences) == 2

    log = []
    newcomer = _Rows(log, "new", rows=1, prompt=3 * PREFILL_CHUNK, fail_at_chunk=2)
    scheduler, running = _with_running(log, newcomer)
    _loop(scheduler, 2)
    errors = [item for item in log if isinstance(item, RuntimeError)]
    assert len(errors) == 1 and newcomer.sequences[0].finished  # the error reached the newcomer alone
    assert ("release", "new") in log and scheduler.prefilling is None
    assert not any(seq.done for seq in running.sequences) and log[-1] == ("step", "running")


def test_newcomers_answered_by_their_first_token_are_released_not_joined():
    log = []
    scheduler, running = _with_running(log, _Rows(log, "new", rows=1, prompt=10, answered=True))
    _loop(scheduler, 1)
    assert ("release", "new") in log and not any(entry[0] == "join" for entry in log if isinstance(entry, tuple))
    assert len(running.sequences) == 2 and scheduler.prefilling is None


def test_the_worker_finishes_a_chunked_prefill_after_the_running_rows_end():
    """With no running batch left and nothing waiting, the worker must not sleep on a prefill in flight."""
    log = []
    newcomer = _Rows(log, "new", rows=1, prompt=3 * PREFILL_CHUNK)
    scheduler, running = _with_running(log, newcomer)
    running.finish_after_steps = 1  # ends right after the newcomer's first chunk
    scheduler.start()
    try:
        deadline = time.monotonic() + 10
        while ("chunk", "new", None) not in log and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        scheduler.stop()
    assert log[:4] == [("start", "new"), ("chunk", "new", PREFILL_CHUNK), ("step", "running"), ("release", "running")]
    assert ("chunk", "new", None) in log  # the rest in one pass: nobody waits for a step any more


def test_a_burst_of_mixed_prompt_lengths_is_taken_as_batches_of_similar_lengths():
    """Padded to the longest, a batch of one long and several short prompts would cost rows x the long one."""
    log = []
    scheduler = Scheduler(make_batch=lambda key, seqs: None, limits=EngineLimits(max_batch_size=16, batch_wait_ms=0))
    for prompt in (30, 500, 40, 480, 35):
        scheduler.submit("mixed", _Seq(log, prompt))
    batches = [[len(seq.prompt_ids) for seq in scheduler._take()[1]] for _ in range(2)]
    assert batches == [[30, 40, 35], [500, 480]] and scheduler._take() is None


def test_short_prompts_beside_a_chunked_prefill_take_at_most_a_chunk_of_tokens_per_loop():
    """Each fits one pass, but all of them between two steps would stall the running rows for their sum."""
    log = []
    long = _Rows(log, "long", rows=1, prompt=4 * PREFILL_CHUNK)
    shorts = [_Rows(log, f"short{i}", rows=1, prompt=PREFILL_CHUNK // 2 - 10) for i in range(4)]
    scheduler, _ = _with_running(log, long, *shorts, keys=("long", *(f"short{i}" for i in range(4))))
    _loop(scheduler, 1)
    assert [("start", f"short{i}") in log for i in range(4)] == [True, True, False, False]
    _loop(scheduler, 1)
    assert all(("start", f"short{i}") in log for i in range(4))
    between_steps, prefilled = [], 0
    for entry in log:
        if entry == ("step", "running"):
            between_steps.append(prefilled)
            prefilled = 0
        elif isinstance(entry, tuple) and entry[0] == "chunk":
            rows = {"long": long, **{short.name: short for short in shorts}}[entry[1]]
            prefilled += entry[2] if entry[2] is not None else len(rows.sequences[0].prompt_ids)
    # two short prompts, then the long one's chunk in what is left, but half a chunk at least
    assert between_steps[:2] == [2 * (PREFILL_CHUNK // 2 - 10) + PREFILL_CHUNK // 2] * 2


def test_where_batches_take_no_joins_a_burst_starts_together_in_order_of_arrival():
    """Split by length, the rest of the burst would wait for the first batch to end."""
    log = []
    limits = EngineLimits(max_batch_size=16, batch_wait_ms=0, join_batches=False)
    scheduler = Scheduler(make_batch=lambda key, seqs: None, limits=limits)
    for prompt in (30, 500, 40):
        scheduler.submit("mixed", _Seq(log, prompt))
    assert [len(seq.prompt_ids) for seq in scheduler._take()[1]] == [30, 500, 40]


def test_a_key_whose_oldest_request_was_passed_keeps_its_place_for_the_next_long_prompt():
    """Else short requests passing its long one would send the key to the back again and again, behind other
    keys' long prompts (sizes in batches of their own)."""
    log = []
    long = 3 * PREFILL_CHUNK
    scheduler, _ = _with_running(log, _Rows(log, "a0", rows=1, prompt=long), keys=("a",))
    _loop(scheduler, 1)  # a0 is chunked
    _submit(scheduler, _Rows(log, "a1", rows=1, prompt=long), "a")
    _submit(scheduler, _Rows(log, "b_long", rows=1, prompt=long), "b")
    for step in range(16):
        _submit(scheduler, _Rows(log, f"b_short{step}", rows=1, prompt=10), "b")  # one passes b_long each loop
        if step == 6:
            _submit(scheduler, _Rows(log, "a2", rows=1, prompt=long), "a")
        _loop(scheduler, 1)
    starts = [entry[1] for entry in log if isinstance(entry, tuple) and entry[0] == "start" and "short" not in entry[1]]
    assert starts == ["a0", "a1", "b_long"]  # a1 was first in line; then b_long, before a2
