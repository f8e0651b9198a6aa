"""Batch formation: a burst gathers while it keeps arriving, up to a cap; a running size waits for a full
batch, or new requests join it where it takes joins."""

from collections import deque
from types import SimpleNamespace

from services.engine.interface import EngineLimits
from services.engine.scheduler import MAX_WINDOWS, Housekeeping, Scheduler

WINDOW = 0.010


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
