"""Faults of the chaos matrix that no other module covers: a worker node that
hangs and comes back, a head late by 30 s, flapping health below the threshold.
(The others are tests in the modules named in scripts/chaos.sh; all carry the
`chaos` mark, and `scripts/chaos.sh` runs them three times in a row.)"""

from __future__ import annotations

import signal
import time

import pytest

from controller import processes
from controller import testing as tk

from .conftest import HEAD_IP, SERVING_TIMEOUT, Cluster, head_args, serving_cluster, stop_cluster

pytestmark = pytest.mark.chaos


def test_a_hung_worker_node_is_detected_and_comes_back_as_one_cluster(tmp_path, chaos_report):
    c = serving_cluster(tmp_path, SERVING_TIMEOUT)
    try:
        s = c.record()
        victim = next(n for n in s["nodes"] if n["address"] == "127.0.0.3")
        pids = tk.node_pids(victim, s["nodes"])
        t0 = time.monotonic()
        processes.signal_all(pids, signal.SIGSTOP)  # the machine hangs: every process of the node stops
        try:
            degraded = tk.wait_cluster_state(c.control_port, "DEGRADED", 90)
            detect_s = time.monotonic() - t0
        finally:
            processes.signal_all(pids, signal.SIGCONT)
        resumed = time.monotonic()
        tk.wait_cluster_state(c.control_port, "SERVING", SERVING_TIMEOUT)
        recover_s = time.monotonic() - resumed
        back = tk.wait_every_node_state(c.control_port, "SERVING", 30)
        c.record()
        # One view of the cluster: every node SERVING under the cluster's epoch, and Ray
        # counting exactly the nodes /status shows.
        assert degraded["cluster"]["alive_nodes"] == 2
        assert sorted((n["address"], n["state"], n["epoch"]) for n in back["nodes"]) == [
            (ip, "SERVING", back["cluster"]["epoch"]) for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4")]
        assert back["cluster"]["alive_nodes"] == 3
        worker_moves = tk.transitions(c.head.events(), victim["node_id"])
        print(f"worker SIGSTOP -> DEGRADED {detect_s:.1f}s; SIGCONT -> SERVING {recover_s:.1f}s; "
              f"the worker's transitions: {[(t['from'], t['to'], t['trigger']) for t in worker_moves]}")
        chaos_report(fault="worker node hang (SIGSTOP, then SIGCONT)", detect_s=detect_s, recover_s=recover_s)
        stop_cluster(c)
    finally:
        c.cleanup()


def test_a_worker_started_30s_before_its_head_joins_it(tmp_path, chaos_report):
    c = Cluster(tmp=tmp_path, ray_port=tk.free_port(), control_port=tk.free_port(), head=None, args=[])  # type: ignore[arg-type]
    token = tmp_path / "ray-token"
    token.write_text("chaos-shared-token\n")
    try:
        worker = c.start(c.worker_args("127.0.0.3", "--join-attempts", "12", "--join-delay", "5", token_file=token),
                         "worker")
        time.sleep(30)
        assert worker.proc.poll() is None  # still trying, not given up
        started = time.monotonic()
        c.head = c.start(head_args(c.ray_port, c.control_port, tmp_path / "state", "--node-ip-address", HEAD_IP,
                                   "--expected-workers", "1", "--ray-token-file", str(token)), "head", c.control_port)
        tk.wait_cluster_state(c.control_port, "SERVING", SERVING_TIMEOUT)
        recover_s = time.monotonic() - started
        s = tk.wait_every_node_state(c.control_port, "SERVING", 30)
        c.record()
        assert sorted((n["role"], n["state"]) for n in s["nodes"]) == [("head", "SERVING"), ("worker", "SERVING")]
        failures = [e for e in worker.events() if e["event"] == "join_attempt_failed"]
        assert len(failures) >= 5 and all("head not reachable" in e["error"] for e in failures)
        chaos_report(fault="worker started 30 s before its head", recover_s=recover_s)
        stop_cluster(c, worker)
    finally:
        c.cleanup()


def test_flapping_health_below_the_threshold_never_degrades(tmp_path, chaos_report):
    """The coordinator paused a little longer than one call's timeout, now and then:
    single failed checks, each followed by good ones, must not make the cluster
    DEGRADED (--failure-threshold 3)."""
    c = serving_cluster(tmp_path, SERVING_TIMEOUT, extra=("--health-interval", "1", "--failure-threshold", "3"))
    try:
        s = c.record()
        head = next(n for n in s["nodes"] if n["role"] == "head")
        actor = [p for p in processes.tree(pgids={head["ray_pgid"]}) if "ray::Coordinator" in processes.cmdline(p)]
        assert len(actor) == 1, actor
        for _ in range(3):
            processes.signal_all(set(actor), signal.SIGSTOP)
            time.sleep(6)  # a coordinator call times out after 5 s: one failed check
            processes.signal_all(set(actor), signal.SIGCONT)
            time.sleep(8)  # good checks again
        events = c.head.events()
        failed = [e for e in events if e["event"] == "health_check_failed" and e["node_id"] == head["node_id"]]
        moves = [(t["from"], t["to"]) for t in tk.transitions(events, head["node_id"])]
        print(f"3 coordinator pauses of 6 s: head's failed checks {[(e['source'], e['consecutive']) for e in failed]}, "
              f"its transitions {moves}")
        assert len(failed) >= 3 and max(e["consecutive"] for e in failed) < 3
        assert ("SERVING", "DEGRADED") not in moves, moves
        assert c.status()["cluster"]["state"] == "SERVING"
        chaos_report(fault="flapping health (coordinator paused 6 s, 3 times)", detect_s=None, recover_s=None)
        stop_cluster(c)
    finally:
        c.cleanup()
