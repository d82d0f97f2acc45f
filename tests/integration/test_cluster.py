"""A real three-node Ray cluster on this machine (head + 2 local workers, each
its own raylet and loopback address), driven through its life in order:
serving, a refused second head, a head controller restart, a worker node
killed and replaced, and a SIGTERM that stops everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from controller import processes
from controller import testing as tk

from .conftest import HEAD_IP, SERVING_TIMEOUT


def ray_view(address: str, token_file) -> list[tuple[str, bool]]:
    """What `ray.nodes()` reports, asked from a separate driver process (with the cluster's token)."""
    code = (
        "import json, ray\n"
        f"ray.init(address={address!r}, _node_ip_address={HEAD_IP!r}, logging_level='ERROR')\n"
        "print(json.dumps(sorted((n['NodeManagerAddress'], n['Alive']) for n in ray.nodes())))\n"
        "ray.shutdown()\n"
    )
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env=env)
    return [tuple(x) for x in json.loads(out.stdout.strip().splitlines()[-1])]


def test_head_and_two_workers_serve_with_one_epoch(cluster):
    s = cluster.record()
    assert s["cluster"]["state"] == "SERVING"
    assert s["cluster"]["alive_nodes"] == 3 and s["cluster"]["expected_nodes"] == 3
    nodes = s["nodes"]
    assert sorted((n["role"], n["address"], n["state"]) for n in nodes) == [
        ("head", "127.0.0.2", "SERVING"), ("worker", "127.0.0.3", "SERVING"), ("worker", "127.0.0.4", "SERVING")]
    epochs = {n["epoch"] for n in nodes}
    assert epochs == {s["cluster"]["epoch"]}, epochs
    assert all(processes.is_running(n["pid"]) for n in nodes)
    # Ray itself sees three live nodes, each on its own loopback address.
    assert ray_view(cluster.head_address, cluster.token_file) == [("127.0.0.2", True), ("127.0.0.3", True), ("127.0.0.4", True)]
    # The control endpoints agree.
    assert tk.get_json(f"http://127.0.0.1:{cluster.control_port}/ready")[0] == 200
    assert tk.get_json(f"http://127.0.0.1:{cluster.control_port}/healthz") == (200, {"alive": True, "state": "SERVING"})
    # Each node logged its way to SERVING, one transition event at a time.
    events = cluster.head.events()
    for n in nodes:
        path = [(t["from"], t["to"]) for t in tk.transitions(events, n["node_id"])]
        assert path[-1][1] == "SERVING", (n["node_id"], path)
        assert path[0] == ("INIT", "JOINING")


def test_the_ray_token_is_private_and_never_shown(cluster):
    token = cluster.token_file.read_text().strip()
    assert len(token) == 64 and oct(cluster.token_file.stat().st_mode & 0o777) == "0o600"
    assert oct(cluster.token_file.parent.stat().st_mode & 0o777) == "0o700"
    shown = [json.dumps(cluster.status()), cluster.head.log_path.read_text(),
             tk.get_json(f"http://127.0.0.1:{cluster.control_port}/healthz")[1].__repr__()]
    with urllib.request.urlopen(f"http://127.0.0.1:{cluster.control_port}/metrics", timeout=5) as resp:
        shown.append(resp.read().decode())
    assert not any(token in text for text in shown)
    auth = [e for e in cluster.head.events() if e["event"] == "ray_auth"]
    assert auth and {e["mode"] for e in auth} == {"token"}  # the head and its local workers


def test_second_head_on_the_same_port_is_refused(cluster):
    before = cluster.status()
    control = tk.free_port()
    args = ["--role", "head", "--ray-port", str(cluster.ray_port), "--control-port", str(control),
            "--node-ip-address", HEAD_IP, "--log-format", "json", "--state-dir", str(cluster.tmp / "state2"),
            "--engine", "none"]
    # With a token of its own (its own state dir), the running Ray head refuses it.
    stranger = cluster.start(args, "stranger-head")
    assert stranger.wait(90) == 1
    last = stranger.log_path.read_text().strip().splitlines()[-1]
    assert last.startswith(f"controller: error: a Ray head already runs at {cluster.head_address} and refuses "
                           "this controller's Ray token"), last
    # With the cluster's token, it finds the head controller that runs it.
    second = cluster.start(args + ["--ray-token-file", str(cluster.token_file)], "second-head")
    t0 = time.monotonic()
    assert second.wait(90) == 1
    took = time.monotonic() - t0
    last = second.log_path.read_text().strip().splitlines()[-1]
    assert last.startswith("controller: error: another head controller")
    assert f"pid {cluster.head.pid}" in last
    assert "Traceback" not in second.log_path.read_text() + stranger.log_path.read_text()
    assert took < 60
    after = cluster.status()  # the first cluster is untouched
    assert after["cluster"]["state"] == "SERVING"
    assert [n["pid"] for n in after["nodes"]] == [n["pid"] for n in before["nodes"]]


def test_the_status_command_shows_the_live_cluster(cluster):
    address = f"127.0.0.1:{cluster.control_port}"
    table = subprocess.run([sys.executable, "-m", "controller", "status", "--control-address", address],
                           capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith(f"cluster SERVING  epoch {cluster.status()['cluster']['epoch']}  ")
    assert "nodes 3/3 alive" in table.stdout
    for ip in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
        row = next(line for line in table.stdout.splitlines() if f"-{ip} " in line and "SERVING" in line)
        assert ip in row
    assert "cluster_ready" in table.stdout  # the head's transition to SERVING, in the last transitions
    raw = subprocess.run([sys.executable, "-m", "controller", "status", "--control-address", address, "--json"],
                         capture_output=True, text=True, timeout=60)
    assert raw.returncode == 0
    shown = json.loads(raw.stdout)
    assert shown["cluster"]["state"] == "SERVING" and len(shown["nodes"]) == 3


@pytest.mark.chaos
def test_restarted_head_controller_reattaches_with_the_same_epoch(cluster, chaos_report):
    before = cluster.record()
    old_head = cluster.head
    t0 = time.monotonic()
    os.kill(old_head.pid, signal.SIGKILL)  # the controller only: its Ray head lives on
    old_head.wait(10)
    cluster.head = cluster.start(cluster.args, "head-restarted", cluster.control_port)
    after = tk.wait_cluster_state(cluster.control_port, "SERVING", SERVING_TIMEOUT)
    chaos_report(fault="head controller killed and restarted (Ray head lives)", recover_s=time.monotonic() - t0)
    cluster.record()
    assert after["cluster"]["epoch"] == before["cluster"]["epoch"]
    workers_before = {n["node_id"]: (n["pid"], n["ray_pgid"]) for n in before["nodes"] if n["role"] == "worker"}
    workers_after = {n["node_id"]: (n["pid"], n["ray_pgid"]) for n in after["nodes"] if n["role"] == "worker"}
    assert workers_after == workers_before  # workers untouched
    head_after = next(n for n in after["nodes"] if n["role"] == "head")
    assert head_after["pid"] == cluster.head.pid != old_head.pid
    assert head_after["ray_pgid"] == next(n["ray_pgid"] for n in before["nodes"] if n["role"] == "head")
    events = cluster.head.events()
    attach = [e for e in events if e["event"] == "coordinator_reattached"]
    assert attach and attach[0]["epoch"] == before["cluster"]["epoch"]
    assert not [e for e in events if e["event"] == "local_worker_started"]
    # Workers never left SERVING: no worker transition after the restart.
    worker_moves = [t for t in tk.transitions(old_head.events()) if t["role"] == "worker"
                    and t["timestamp"] > attach[0]["timestamp"]]
    assert worker_moves == []


@pytest.mark.chaos
def test_killed_worker_node_degrades_and_a_new_worker_recovers(cluster, chaos_report):
    s = cluster.record()
    victim = next(n for n in s["nodes"] if n["address"] == "127.0.0.3")
    t0 = time.monotonic()
    killed = tk.kill_node(victim)
    assert victim["pid"] in killed and len(killed) >= 3  # controller, raylet and its helpers
    degraded = tk.wait_cluster_state(cluster.control_port, "DEGRADED", 60)
    detect_s = time.monotonic() - t0
    lost = next(n for n in degraded["nodes"] if n["node_id"] == victim["node_id"])
    assert lost["state"] == "LOST" and lost["alive"] is False
    assert degraded["cluster"]["alive_nodes"] == 2
    head_moves = tk.transitions(cluster.head.events(), "head-127.0.0.2")
    assert head_moves[-1]["trigger"] == "node_lost" and "2/3 nodes alive" in head_moves[-1]["reason"]
    print(f"worker SIGKILL -> DEGRADED on /status: {detect_s:.1f}s")
    # /metrics tells the same story: the transition, how long detection took
    # (from the lost node's last heartbeat), the node counts and the lost node's state.
    m = tk.metrics(cluster.control_port)
    assert m[("llmctl_transitions_total", frozenset({"role": "head", "from": "SERVING", "to": "DEGRADED",
                                                     "trigger": "node_lost"}.items()))] == 1
    assert m[("llmctl_detection_seconds_count", frozenset())] == 1
    assert 0 < m[("llmctl_detection_seconds_sum", frozenset())] < detect_s + 5
    assert (m[("llmctl_nodes_alive", frozenset())], m[("llmctl_nodes_expected", frozenset())]) == (2, 3)
    lost_state = {"node_id": victim["node_id"], "role": "worker"}
    assert m[("llmctl_node_state", frozenset({**lost_state, "state": "LOST"}.items()))] == 1
    assert m[("llmctl_node_state", frozenset({**lost_state, "state": "SERVING"}.items()))] == 0

    newcomer = cluster.start(cluster.worker_args("127.0.0.5", "--join-delay", "2"), "worker-127.0.0.5")
    tk.wait_cluster_state(cluster.control_port, "SERVING", SERVING_TIMEOUT)
    # The workers follow the cluster's state a moment later (they hear it by long-poll).
    def all_serving():
        st = cluster.status()
        return st if sum(n["state"] == "SERVING" for n in st["nodes"]) == 3 else None

    s = tk.wait_for(all_serving, 30, what="every live node SERVING")
    cluster.record()
    serving = sorted(n["address"] for n in s["nodes"] if n["state"] == "SERVING")
    assert serving == ["127.0.0.2", "127.0.0.4", "127.0.0.5"]
    assert tk.transitions(cluster.head.events(), "head-127.0.0.2")[-1]["trigger"] == "recovered"
    assert newcomer.proc.poll() is None
    m = tk.metrics(cluster.control_port)
    assert m[("llmctl_recovery_seconds_count", frozenset())] == 1
    assert m[("llmctl_transitions_total", frozenset({"role": "head", "from": "DEGRADED", "to": "SERVING",
                                                     "trigger": "recovered"}.items()))] == 1
    # Workers' transitions, as the coordinator counted them: three workers joined in all.
    assert m[("llmctl_transitions_total", frozenset({"role": "worker", "from": "JOINING",
                                                     "to": "WAITING_FOR_WORKERS", "trigger": "joined"}.items()))] == 3
    assert m[("llmctl_nodes_alive", frozenset())] == 3
    chaos_report(fault="worker node SIGKILL (cluster only), then a new worker", detect_s=detect_s)


def test_sigterm_to_head_stops_every_node_and_leaves_nothing(cluster):
    s = cluster.record()
    live = [n for n in s["nodes"] if n["alive"]]
    assert len(live) == 3
    cluster.head.terminate()
    assert cluster.head.wait(120) == 0
    logs = [p.log_path for p in cluster.started]
    events = [e for path in logs for e in tk.read_events(path)]
    for n in live:
        last = tk.transitions(events, n["node_id"])[-1]
        assert (last["from"], last["to"]) == ("DRAINING", "STOPPED"), (n["node_id"], last)
    head_drain = [t for t in tk.transitions(events, "head-127.0.0.2") if t["to"] == "DRAINING"][-1]
    assert head_drain["reason"] == "SIGTERM received"
    worker_drains = [t for t in tk.transitions(events) if t["role"] == "worker" and t["to"] == "DRAINING"]
    assert {t["reason"] for t in worker_drains} == {"the head asked the cluster to drain"}
    # Nothing of the test's is left: controllers, Ray daemons, Ray workers.
    tk.wait_for(lambda: not cluster.leftovers(), 30, what="no process of the test left")
