"""The head node lost as a machine failure would take it: its worker notices, goes
DEGRADED, and when a new head starts a new cluster (new epoch) it rejoins."""

from __future__ import annotations

import time

import pytest

from controller import testing as tk

from .conftest import HEAD_IP, SERVING_TIMEOUT, Cluster, head_args, stop_cluster


@pytest.mark.chaos
def test_worker_rejoins_a_new_head_under_a_new_epoch(tmp_path, chaos_report):
    c = Cluster(tmp=tmp_path, ray_port=tk.free_port(), control_port=tk.free_port(), head=None, args=[])  # type: ignore[arg-type]
    args = head_args(c.ray_port, c.control_port, tmp_path / "state", "--node-ip-address", HEAD_IP,
                     "--expected-workers", "1")
    try:
        c.head = c.start(args, "head-1", c.control_port)
        worker = c.start(c.worker_args("127.0.0.3", "--join-delay", "2", "--join-attempts", "10"), "worker")
        first = tk.wait_cluster_state(c.control_port, "SERVING", SERVING_TIMEOUT)
        c.record()
        head_node = next(n for n in first["nodes"] if n["role"] == "head")
        t0 = time.monotonic()
        tk.kill_node(head_node, first["nodes"])
        c.head.wait(10)

        def worker_moves():
            return [(t["from"], t["to"], t["trigger"]) for t in tk.transitions(worker.events())]

        tk.wait_for(lambda: ("SERVING", "DEGRADED", "head_lost") in worker_moves(), 60, what="worker DEGRADED")
        detect_s = time.monotonic() - t0
        print(f"head node SIGKILL -> worker DEGRADED: {detect_s:.1f}s")
        assert worker.proc.poll() is None  # the worker controller outlives its head

        restarted = time.monotonic()
        c.head = c.start(args, "head-2", c.control_port)
        tk.wait_cluster_state(c.control_port, "SERVING", SERVING_TIMEOUT)
        chaos_report(fault="head node lost; a new head (new epoch), the worker rejoins", detect_s=detect_s,
                     recover_s=time.monotonic() - restarted)
        second = tk.wait_every_node_state(c.control_port, "SERVING", 30)
        c.record()
        assert second["cluster"]["epoch"] == first["cluster"]["epoch"] + 1
        rejoined = next(n for n in second["nodes"] if n["role"] == "worker")
        assert rejoined["epoch"] == second["cluster"]["epoch"] and rejoined["state"] == "SERVING"
        assert rejoined["pid"] == worker.pid
        moves = worker_moves()
        assert ("DEGRADED", "JOINING", "rejoin") in moves
        # It rejoined because its old cluster is gone: either the new coordinator's epoch
        # (its calls under the old one are refused: fencing) or the head answering while
        # its old coordinator does not, whichever it saw first.
        rejoin = next(t for t in tk.transitions(worker.events()) if t["trigger"] == "rejoin")
        assert rejoin["reason"] in (f"cluster epoch is {second['cluster']['epoch']}, joined under "
                                    f"{first['cluster']['epoch']}",
                                    "head answers again but the coordinator does not: a new cluster"), rejoin
        assert moves[-2:] == [("JOINING", "WAITING_FOR_WORKERS", "joined"),
                              ("WAITING_FOR_WORKERS", "SERVING", "cluster_serving")]
        stop_cluster(c, worker)
    finally:
        c.cleanup()
