"""bench/'s arithmetic and outputs, without a cluster: where the sweep calls
saturation, how the failure timeline is read, the peer comparison. (The files
they write: tests/cli/test_bench_outputs.py, as matplotlib runs fc-list.)"""

from bench import failure, peer, sweep


def _run(rate, achieved, ok, requests, p50):
    return {"rate": rate, "report": {"offered_rate": rate, "achieved_rate": achieved, "ok": ok,
                                     "requests": requests, "latency_s": {"p50": p50}}}


def test_saturation_is_the_first_rate_the_server_does_not_keep_up_with():
    runs = [_run(2, 2.0, 60, 60, 0.05), _run(4, 3.9, 120, 120, 0.06), _run(8, 7.9, 240, 240, 0.11),
            _run(16, 9.0, 400, 480, 2.0)]
    s = sweep.saturation(runs)
    assert s["saturated_at"] == 8 and s["last_sustained"] == 4
    assert "over twice" in s["why"]
    s = sweep.saturation(runs[:2])
    assert s["saturated_at"] is None and s["last_sustained"] == 4
    s = sweep.saturation([_run(2, 1.5, 45, 60, 0.05)])
    assert s["saturated_at"] == 2 and "achieved 1.50/s" in s["why"] and "15 of 60 failed" in s["why"]


def test_the_failure_timeline_finds_the_first_change_after_a_moment():
    t = failure.Timeline("http://127.0.0.1:1", 0.0)
    t.changes = [(0.0, "SERVING", 2), (3.0, "DEGRADED", 2), (5.0, "SERVING", 2), (9.0, "DEGRADED", 2),
                 (15.0, "DEGRADED", 1), (80.0, "SERVING", 2)]
    assert t.first(4.0, state="DEGRADED") == 9.0
    assert t.first(0.0, alive_below=2) == 15.0
    assert t.first(81.0, state="SERVING") is None


def test_the_peer_comparison_takes_each_tools_median_round_and_the_difference():
    def run(tool, e2el_p50):
        return {"tool": tool, "ms": {m: {"p50": e2el_p50, "p99": 2 * e2el_p50} for m in peer.METRICS}}
    table = peer.compare([run("ours", 50), run("vllm", 40), run("ours", 60), run("vllm", 50), run("ours", 55)])
    assert table["e2el p50"] == {"ours_ms": 55, "vllm_ms": 45, "diff_pct": 22.2, "ours_rounds": [50, 60, 55],
                                 "vllm_rounds": [40, 50]}
    md = peer.markdown({"config": {"requests": 1, "rate": 1, "input_len": 1, "output_len": 1, "rounds": 1},
                        "environment": {}, "comparison": table})
    assert "| e2el p50 | 55.0 | 45.0 | +22.2% **>10%** | 50.0 / 60.0 / 55.0 | 40.0 / 50.0 |" in md
