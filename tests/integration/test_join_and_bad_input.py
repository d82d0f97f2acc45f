"""Joining against the clock, and bad input that must fail fast, clearly and cleanly."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time

from controller import processes
from controller import testing as tk

from .conftest import HEAD_IP, SERVING_TIMEOUT, Cluster, head_args, stop_cluster


def last_line(p: tk.ControllerProcess) -> str:
    return p.log_path.read_text().strip().splitlines()[-1]


def ray_groups_from_log(p: tk.ControllerProcess) -> set[int]:
    return {e["pgid"] for e in p.events() if e.get("event") == "ray_started"}


def new_cluster(tmp_path) -> Cluster:
    return Cluster(tmp=tmp_path, ray_port=tk.free_port(), control_port=tk.free_port(), head=None, args=[])  # type: ignore[arg-type]


def test_worker_started_before_its_head_retries_and_joins(tmp_path):
    c = new_cluster(tmp_path)
    # The head is not there to make a token: both are given one, as a Secret would give it.
    token = tmp_path / "ray-token"
    token.write_text("a-shared-test-token-7f3c\n")
    try:
        worker = c.start(c.worker_args("127.0.0.3", "--join-attempts", "10", "--join-delay", "3", token_file=token),
                         "worker")
        tk.wait_for(lambda: len([e for e in worker.events() if e["event"] == "join_attempt_failed"]) >= 2,
                    60, what="two failed join attempts")
        c.head = c.start(head_args(c.ray_port, c.control_port, tmp_path / "state", "--node-ip-address", HEAD_IP,
                                   "--expected-workers", "1", "--ray-token-file", str(token)), "head", c.control_port)
        s = tk.wait_every_node_state(c.control_port, "SERVING", SERVING_TIMEOUT)
        c.record()
        assert sorted((n["role"], n["state"]) for n in s["nodes"]) == [("head", "SERVING"), ("worker", "SERVING")]
        events = worker.events()
        failures = [e for e in events if e["event"] == "join_attempt_failed"]
        assert all("head not reachable" in e["error"] for e in failures)
        assert [e["attempt"] for e in failures] == list(range(1, len(failures) + 1))
        assert all(e["wait_s"] == 3.0 for e in failures)
        assert [e for e in events if e["event"] == "registered"]

        # A second node claiming the same IP is refused by the coordinator: once, clearly, cleanly.
        imposter = c.start(c.worker_args("127.0.0.3", "--node-id", "imposter", "--join-delay", "1", token_file=token),
                           "imposter")
        assert imposter.wait(90) == 1
        assert last_line(imposter) == (
            "controller: error: the coordinator refused this node: node imposter reports address 127.0.0.3, "
            "which node worker-127.0.0.3 already has: every node needs its own IP (set --node-ip-address)")
        assert len([e for e in imposter.events() if e["event"] == "join_attempt"]) == 1  # not retried
        groups = ray_groups_from_log(imposter)
        assert groups  # it did start Ray, and stopped it when refused
        c.pgids |= groups
        assert not processes.tree({imposter.pid}, groups)
        assert c.status()["cluster"]["state"] == "SERVING"

        # Ray's token authentication: a worker with a wrong token is refused by Ray, once;
        # one with no token at all does not start.
        wrong = tmp_path / "wrong-token"
        wrong.write_text("not-the-cluster-token\n")
        intruder = c.start(c.worker_args("127.0.0.4", "--join-delay", "1", token_file=wrong), "intruder")
        assert intruder.wait(120) == 1
        assert "refused this node's token" in last_line(intruder), last_line(intruder)
        assert len([e for e in intruder.events() if e["event"] == "join_attempt"]) == 1  # not retried
        c.pgids |= ray_groups_from_log(intruder)
        assert not processes.tree({intruder.pid}, ray_groups_from_log(intruder))
        tokenless = c.start(["--role", "worker", "--head-address", c.head_address, "--node-ip-address", "127.0.0.4",
                             "--log-format", "json"], "tokenless")
        assert tokenless.wait(60) == 2
        assert last_line(tokenless).startswith("controller: error: a worker needs the cluster's Ray token")
        assert not ray_groups_from_log(tokenless)
        s = c.status()
        assert s["cluster"]["state"] == "SERVING" and len(s["nodes"]) == 2
        assert "a-shared-test-token" not in "".join(p.log_path.read_text() for p in c.started)

        # The operator's drain (a Kubernetes preStop hook): the whole cluster stops, cleanly.
        drain = subprocess.run([sys.executable, "-m", "controller", "drain", "--control-address",
                                f"127.0.0.1:{c.control_port}", "--timeout", "120"], capture_output=True, text=True,
                               timeout=180)
        assert drain.returncode == 0, drain.stderr
        assert drain.stdout.strip().splitlines()[-1] == "controller drain: the head has stopped"
        assert c.head.wait(10) == 0
        head_drain = [t for t in tk.transitions(c.head.events()) if t["to"] == "DRAINING"]
        assert head_drain[0]["reason"] == "drain requested over the control API"
        stop_cluster(c, worker)
    finally:
        c.cleanup()


def test_unreachable_head_fails_after_bounded_retries(tmp_path):
    c = new_cluster(tmp_path)
    try:
        t0 = time.monotonic()
        worker = c.start(["--role", "worker", "--head-address", f"127.0.0.9:{tk.free_port()}",
                          "--node-ip-address", "127.0.0.3", "--log-format", "json", "--ray-auth", "none",
                          "--join-attempts", "3", "--join-delay", "1"], "worker")
        assert worker.wait(60) == 1
        took = time.monotonic() - t0
        assert took < 30, took
        line = last_line(worker)
        assert re.match(r"controller: error: could not join the head at 127\.0\.0\.9:\d+ after 3 attempts: "
                        r"head not reachable", line), line
        assert "Traceback" not in worker.log_path.read_text()
        attempts = [e["attempt"] for e in worker.events() if e["event"] == "join_attempt"]
        assert attempts == [1, 2, 3]
        assert not ray_groups_from_log(worker)  # never got as far as starting Ray
        assert not c.leftovers()
    finally:
        c.cleanup()


def test_workers_that_never_come_end_in_a_clear_error_and_no_ray(tmp_path):
    c = new_cluster(tmp_path)
    try:
        c.head = c.start(head_args(c.ray_port, c.control_port, tmp_path / "state", "--node-ip-address", HEAD_IP,
                                   "--expected-workers", "1", "--wait-timeout", "8"), "head", c.control_port)
        assert c.head.wait(120) == 1
        line = last_line(c.head)
        assert line == "controller: error: workers did not join within 8s: 1/2 nodes alive, 0/1 workers registered"
        groups = ray_groups_from_log(c.head)
        assert len(groups) == 1  # Ray was started, and must be gone now
        c.pgids |= groups
        assert not c.leftovers()
        moves = [(t["from"], t["to"], t["trigger"]) for t in tk.transitions(c.head.events())]
        assert moves[-1] == ("WAITING_FOR_WORKERS", "STOPPED", "fatal")
    finally:
        c.cleanup()


def test_control_port_in_use_fails_before_anything_starts(tmp_path):
    c = new_cluster(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", c.control_port))
        taken.listen()
        try:
            c.head = c.start(head_args(c.ray_port, c.control_port, tmp_path / "state",
                                       "--node-ip-address", HEAD_IP), "head")
            assert c.head.wait(30) == 1
            assert re.match(rf"controller: error: control port 127\.0\.0\.1:{c.control_port} is not available",
                            last_line(c.head))
            assert not ray_groups_from_log(c.head)
            assert not c.leftovers()
        finally:
            c.cleanup()


def test_ray_port_held_by_something_else_is_refused(tmp_path):
    c = new_cluster(tmp_path)
    with socket.socket() as taken:
        taken.bind((HEAD_IP, c.ray_port))
        taken.listen()
        try:
            c.head = c.start(head_args(c.ray_port, c.control_port, tmp_path / "state",
                                       "--node-ip-address", HEAD_IP), "head", c.control_port)
            assert c.head.wait(60) == 1
            assert f"Ray port {c.ray_port} on {HEAD_IP} is in use by something that is not a Ray head" \
                in last_line(c.head)
            assert not ray_groups_from_log(c.head)
            assert not c.leftovers()
        finally:
            c.cleanup()
