"""bench/'s failover figures, without a cluster: the streams under way on a killed
replica and the gap their clients saw (failure.py), the requests a stall cost
and the counters it moved (stall.py)."""

from bench import failure, stall


def _stream(sent, ttft, itl, latency, replica="replica-w", status=200, done=True, target="gateway"):
    return {"target": target, "planned": sent, "send_lag": 0.0, "status": status, "latency": latency,
            "ttft": ttft, "itl": itl, "tokens": len(itl) + 1, "error": None, "replica": replica, "done": done}


def test_a_streams_gap_at_the_failure_is_its_longest_silence_ending_after_it():
    # sent at 10, tokens at 10.1, 10.2, 10.3, then 1.5 s of silence (the kill at 10.35), 10.9 ... end at 11.95
    s = _stream(10.0, 0.1, [0.1, 0.1, 1.5, 0.05], 1.95)
    assert [round(t, 2) for t in failure.moments(s)] == [10.0, 10.1, 10.2, 10.3, 11.8, 11.85, 11.95]
    assert round(failure.gap_at(s, 10.3), 3) == 1.5
    assert round(failure.gap_at(s, 10.35), 3) == 1.45  # a gap under way at the moment counts from it
    assert round(failure.gap_at(s, 11.81), 3) == 0.1   # only what comes after the moment counts
    assert failure.gap_at(s, 12.0) is None


def test_streams_under_way_on_the_victim_are_those_it_began_and_that_were_not_over():
    on = _stream(10.0, 0.1, [0.1, 2.0], 2.3)
    over = _stream(9.0, 0.1, [0.1], 0.3)                       # ended at 9.3, before the kill at 10.2
    later = _stream(10.5, 0.1, [0.1], 0.3)                    # sent after the kill
    elsewhere = _stream(10.0, 0.1, [0.1, 0.1], 0.4, replica="replica-h")
    cut = _stream(10.0, 0.1, [0.1], 1.0, status=599, done=False, target="long")  # an error event
    no_end = _stream(10.0, 0.1, [0.1], 1.0, done=False)      # 200 but no [DONE]
    samples = [on, over, later, elsewhere, cut, no_end]
    assert [failure.under_way_on(s, "replica-w", 10.2) for s in samples] == [True, False, False, False, True, True]
    continued = [{"reason": "disconnect", "gap_ms": 900.0, "tokens_replayed": 2},
                 {"reason": "disconnect", "gap_ms": None, "tokens_replayed": 3}]
    f = failure.stream_figures(samples, "replica-w", 10.2, continued)
    assert f["in_flight_on_victim"] == 3 and f["long_in_flight_on_victim"] == 1 and f["broken"] == 2
    assert f["client_gap_s"]["n"] == 3 and round(f["client_gap_s"]["max"], 3) == 2.0
    assert f["gateway_gap_s"]["n"] == 1 and f["gateway_gap_s"]["p50"] == 0.9 and f["gateway_gap_null"] == 1
    assert f["tokens_recomputed"] == 5 and f["continued_by_reason"] == {"disconnect": 2}


def test_a_stall_costs_the_requests_sent_after_it_that_failed_or_took_over_five_seconds():
    samples = [_stream(1.0, 0.1, [], 9.0),                  # before the stall: not counted, however slow
               _stream(5.0, 0.1, [], 0.2),                  # after, fast
               _stream(5.5, 0.1, [], 5.2),                  # after, slow
               _stream(6.0, None, [], 0.1, status=503)]     # after, failed
    assert [s["planned"] for s in stall.slow_after(samples, 4.0)] == [5.5, 6.0]


def test_the_stall_counters_are_read_as_differences():
    before = {"stalls": 1, "continuations": {"stall": 2}, "requests_failed": {}, "engine_restarts": 0}
    after = {"stalls": 2, "continuations": {"stall": 5, "disconnect": 1}, "requests_failed": {}, "engine_restarts": 1}
    assert stall.delta(after, before) == {"stalls": 1, "continuations": {"stall": 3, "disconnect": 1},
                                          "requests_failed": {}, "engine_restarts": 1}


def test_a_stall_never_seen_counts_as_longer_than_any_seen_in_the_median():
    assert stall.median([2.0, None, 2.4]) == 2.4
    assert stall.median([None, None, 2.4]) is None
    assert stall.median([]) is None


def test_the_state_at_a_moment_is_the_last_change_at_or_before_it():
    t = failure.Timeline("http://127.0.0.1:1", 0.0)
    t.changes = [(0.0, "SERVING", 2), (3.0, "DEGRADED", 2), (9.0, "SERVING", 2)]
    assert [stall.state_at(t, x) for x in (-1.0, 2.0, 3.0, 8.9, 20.0)] == [None, "SERVING", "DEGRADED", "DEGRADED",
                                                                         "SERVING"]
