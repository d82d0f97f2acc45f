"""The status command's tables and errors, without a cluster (a live one: tests/integration/test_cluster.py)."""

import subprocess
import sys
from datetime import datetime, timezone

from rich.console import Console

from controller.surface import status_command

STATUS = {
    "cluster": {"state": "DEGRADED", "epoch": 4, "mode": "replicated", "engine": "vllm",
                "expected_nodes": 2, "alive_nodes": 1, "coordinator_reachable": True},
    "nodes": [{"node_id": "head-127.0.0.2", "role": "head", "state": "DEGRADED", "address": "127.0.0.2",
               "since": "2026-11-23T10:00:00.000Z", "pid": 11},
              {"node_id": "worker-127.0.0.3", "role": "worker", "state": "LOST", "address": "127.0.0.3",
               "since": "2026-11-23T10:00:50.000Z", "pid": 12}],
    "replicas": [{"replica_id": "replica-head-127.0.0.2", "node_id": "head-127.0.0.2", "state": "READY",
                  "url": "http://127.0.0.2:9001", "in_flight": 2, "requests": 40, "failed": 1, "restarts": 0}],
    "transitions": [{"at": "2026-11-23T10:00:55.000Z", "node_id": "head-127.0.0.2", "from": "SERVING",
                     "to": "DEGRADED", "trigger": "node_lost", "reason": "1/2 nodes alive"}],
}


def test_the_tables_show_cluster_nodes_replicas_and_transitions():
    console = Console(record=True, width=200)
    now = datetime(2026, 11, 23, 10, 1, 0, tzinfo=timezone.utc)
    console.print(status_command.render(STATUS, "127.0.0.1:8080", now=now))
    text = console.export_text()
    assert "cluster DEGRADED  epoch 4  mode replicated  engine vllm  nodes 1/2 alive  control 127.0.0.1:8080" in text
    row = next(line for line in text.splitlines() if "worker-127.0.0.3" in line)
    assert "LOST" in row and "127.0.0.3" in row and "10s ago" in row
    row = next(line for line in text.splitlines() if "replica-head-127.0.0.2" in line)
    assert "READY" in row and "http://127.0.0.2:9001" in row and " 40 " in row
    row = next(line for line in text.splitlines() if "node_lost" in line)
    assert "SERVING" in row and "DEGRADED" in row and "1/2 nodes alive" in row and "5s ago" in row


def run(*argv):
    return subprocess.run([sys.executable, "-m", "controller", "status", *argv], capture_output=True, text=True,
                          timeout=60)


def test_an_unreachable_head_is_one_line_and_exit_1():
    r = run("--control-address", "127.0.0.1:1")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("controller status: error: cannot reach the head's control port at 127.0.0.1:1")
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_arguments_exit_2():
    for argv, message in ((["--control-address", "nope"], "control-address must be HOST:PORT, got 'nope'"),
                          (["--watch", "0"], "--watch must be greater than 0, got 0"),
                          (["--bogus"], "unrecognized arguments: --bogus")):
        r = run(*argv)
        assert (r.returncode, r.stderr) == (2, f"controller status: error: {message}\n")
