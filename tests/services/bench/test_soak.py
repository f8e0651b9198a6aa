"""The soak's verdict: flat memory passes; growth, a leak of KV, errors or refused good requests fail."""

from services.bench.soak import Tally, verdict

MIB = 2 ** 20


def _timeline(level_at) -> list[tuple[float, int, float]]:
    return [(t * 5.0, int(level_at(t * 5.0) * MIB), 0.0) for t in range(0, 37)]  # 3 minutes, every 5 s


def _served() -> Tally:
    return Tally(ok=200, bad_refused=20)


def test_flat_memory_with_noise_passes():
    noisy = _timeline(lambda t: 1000 + (25 if int(t) % 20 == 0 else 0))  # a prefill caught now and then
    result = verdict(noisy, _served(), tolerance=0.05, bound_mib=5000)
    assert result["passed"] and result["reference_s"] == 60.0 and abs(result["growth"]) < 0.01


def test_growth_past_the_tolerance_fails():
    growing = _timeline(lambda t: 1000 + t)
    result = verdict(growing, _served(), tolerance=0.05, bound_mib=5000)
    assert not result["checks"]["memory_flat"] and not result["passed"]
    assert not verdict(growing, _served(), tolerance=0.05, bound_mib=1100)["checks"]["under_bound"]


def test_errors_leaks_and_refusals_fail():
    flat = _timeline(lambda t: 1000)
    for tally, check in ((Tally(ok=200, server_errors=1), "no_5xx"), (Tally(ok=200, connection_errors=1),
                         "no_connection_errors"), (Tally(ok=200, bad_accepted=1), "bad_input_4xx"),
                         (Tally(ok=200, client_errors=3), "good_requests_served"),
                         (Tally(ok=200, kv_in_use_after=4096.0), "kv_returned")):
        result = verdict(flat, tally, tolerance=0.05, bound_mib=5000)
        assert not result["checks"][check] and not result["passed"], check
