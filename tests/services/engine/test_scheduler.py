"""Batch formation: a burst gathers while it keeps arriving, up to a cap; a running size waits for a full batch."""

from collections import deque

from services.engine.scheduler import MAX_WINDOWS, Scheduler, SchedulerLimits

WINDOW = 0.010


def _scheduler() -> Scheduler:
    return Scheduler(make_batch=lambda key, seqs: None, limits=SchedulerLimits(max_batch_size=16, batch_wait_s=WINDOW))


def _queue(arrivals: list[float]) -> deque:
    return deque((t, object()) for t in arrivals)


def test_a_burst_gathers_until_a_window_passes_without_arrivals():
    scheduler, burst = _scheduler(), _queue([0.0, 0.008, 0.016])
    assert not scheduler._ready(23, burst, now=0.020)  # the oldest waited two windows, the newest not one
    assert scheduler._ready(23, burst, now=0.027)


def test_a_steady_stream_is_cut_after_the_cap():
    scheduler, stream = _scheduler(), _queue([0.005 * i for i in range(15)])
    assert not scheduler._ready(23, stream, now=0.072)
    assert scheduler._ready(23, stream, now=MAX_WINDOWS * WINDOW + 0.001)


def test_a_size_with_a_running_batch_waits_unless_the_batch_would_be_full():
    scheduler = _scheduler()
    scheduler.active.append((23, object()))
    assert not scheduler._ready(23, _queue([0.0]), now=1.0)
    assert scheduler._ready(23, _queue([0.0] * 16), now=0.0)
    assert scheduler._ready(17, _queue([0.0]), now=1.0)  # another size is not held back
