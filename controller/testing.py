"""Test kit: start controllers as real processes, read their status and logs,
and kill a node the way a machine failure would. Used by tests and bench/; the
product never imports it (tests/unit/test_layering.py checks).

A node is killed as a whole: its controller pid, the process group of its Ray
daemons (`ray_pgid` in /status) and every descendant of those.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from controller import processes
from controller.engines.engine import free_port  # noqa: F401  (re-exported for tests)
from controller.surface.client import (  # noqa: F401  (re-exported for tests)
    complete, get_json, metrics, status, wait_cluster_state, wait_for)


@dataclass
class ControllerProcess:
    """One `python -m controller` process started by a test, in its own session."""

    args: list[str]
    log_path: Path
    proc: subprocess.Popen
    control_port: int | None = None
    extra_pids: set[int] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.log_path)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stderr_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def start_controller(args: list[str], log_path: Path, env: dict[str, str] | None = None,
                     control_port: int | None = None) -> ControllerProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLMCTL_")}
    full_env.update(env or {})
    log_file = open(log_path, "ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "controller", *args],
        stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        env=full_env, start_new_session=True,
    )
    log_file.close()
    return ControllerProcess(args=args, log_path=log_path, proc=proc, control_port=control_port)


def read_events(log_path: Path) -> list[dict[str, Any]]:
    events = []
    for line in Path(log_path).read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return events


def transitions(events: list[dict[str, Any]], node_id: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e.get("event") == "transition"
            and (node_id is None or e.get("node_id") == node_id)]


def wait_every_node_state(control_port: int, state: str, timeout: float) -> dict[str, Any]:
    """The cluster and every node /status lists in `state`. Workers follow the
    cluster's state a moment after the head (they hear it by long-poll), so a
    /status read just as the cluster turns can still show a worker's old state."""
    def check():
        s = status(control_port)
        return s if s["cluster"]["state"] == state and all(n["state"] == state for n in s["nodes"]) else None
    return wait_for(check, timeout, what=f"cluster and every node {state}")


def node_pids(node: dict[str, Any], others: list[dict[str, Any]] = ()) -> set[int]:
    """All live processes of a node from its /status entry: controller, Ray group,
    descendants; never those of the `others` nodes (a head's local workers are
    its children, but they are other machines)."""
    roots = {node["pid"]} if node.get("pid") else set()
    groups = {node["ray_pgid"]} if node.get("ray_pgid") else set()
    exclude = {n["pid"] for n in others if n.get("pid") and n["node_id"] != node["node_id"]}
    return processes.tree(roots, groups, exclude)


def engine_core_pid(api_server_pid: int) -> int:
    """vLLM's engine core: the child of the API server that generates tokens."""
    for pid in processes.tree({api_server_pid}) - {api_server_pid}:
        try:
            if "EngineCore" in Path(f"/proc/{pid}/cmdline").read_text() + Path(f"/proc/{pid}/comm").read_text():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no EngineCore process under {api_server_pid}")


def kill_node(node: dict[str, Any], others: list[dict[str, Any]] = ()) -> set[int]:
    """SIGKILL every process of a node at once, as a machine failure would. Returns the pids.

    Pass the other nodes of `/status` as `others` when the node is a head with local workers.
    """
    pids = node_pids(node, others)
    left = processes.kill_now(pids)
    if left:
        raise RuntimeError(f"processes survived SIGKILL: {sorted(left)}")
    return pids


def stop_head(head: ControllerProcess, pids: set[int], pgids: set[int], timeout: float = 180.0) -> set[int]:
    """SIGTERM the head and wait for its drain, then stop whatever of the cluster is
    left, by pid and group, whatever happened; returns survivors."""
    head.terminate()
    try:
        head.wait(timeout)
    finally:
        left = stop_everything(pids | {head.pid}, pgids)
    return left


def stop_everything(pids: set[int], pgids: set[int], grace: float = 10.0) -> set[int]:
    """Test cleanup: stop what a test started (by pid and group); returns survivors."""
    return processes.terminate(processes.tree(pids, pgids), grace)
