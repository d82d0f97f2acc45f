"""Shutdown from every direction, bounded: a head whose terminal is closed drains
(SIGHUP) and leaves nothing running; a worker told to stop while its head is gone
is gone within its drain timeout plus the fixed bound for stopping Ray."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

import pytest

from controller import processes
from controller import testing as tk
from controller.lifecycle.worker import RELEASE_GRACE_S, STOP_BOUND_S
from controller.surface.cli import STUCK_CALLS_WAIT_S

from .conftest import SERVING_TIMEOUT, head_args

pytestmark = pytest.mark.integration

# Addresses of these tests' nodes, apart from the other tests' 127.0.0.2-9.
TERMINAL_HEAD_IP = "127.0.0.50"
LONE_HEAD_IP, LONE_WORKER_IP = "127.0.0.60", "127.0.0.61"


class Terminal:
    """A pseudo-terminal the head runs in, as a shell's would: the head is its session
    leader with the terminal as its controlling terminal. Its output is copied to
    `log_path` until `close()`, which hangs the terminal up as closing a window or
    `tmux kill-session` does: the kernel sends SIGHUP, later writes fail (EIO)."""

    def __init__(self, log_path: Path) -> None:
        self.master, self.slave = os.openpty()
        self.log_path = log_path
        self._open = True
        self._reader = threading.Thread(target=self._copy, daemon=True)

    def _copy(self) -> None:
        with open(self.log_path, "ab") as out:
            while self._open:
                ready, _, _ = select.select([self.master], [], [], 0.2)
                if not ready:
                    continue
                try:
                    data = os.read(self.master, 65536)
                except OSError:  # EIO once nothing holds the terminal's other side
                    return
                out.write(data.replace(b"\r\n", b"\n"))
                out.flush()

    def start(self, args: list[str]) -> subprocess.Popen:
        def take_terminal() -> None:  # in the child, after setsid: the terminal becomes its own
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        env = {k: v for k, v in os.environ.items() if not k.startswith("LLMCTL_")}
        proc = subprocess.Popen([sys.executable, "-m", "controller", *args], stdin=self.slave, stdout=self.slave,
                                stderr=self.slave, env=env, start_new_session=True, preexec_fn=take_terminal)
        os.close(self.slave)
        self._reader.start()
        return proc

    def close(self) -> None:
        self._open = False
        self._reader.join(5)
        os.close(self.master)


def test_a_closed_terminal_drains_the_head_and_its_local_worker(tmp_path):
    """SIGHUP (the terminal of a head started by hand is closed) drains like SIGTERM:
    the head exits 0 and nothing of the cluster is left, its local worker (which gets
    no SIGHUP: it runs in a session of its own) and both nodes' Ray included, though
    every write to the terminal fails from then on."""
    ray_port, control_port = tk.free_port(), tk.free_port()
    args = head_args(ray_port, control_port, tmp_path / "state", "--node-ip-address", TERMINAL_HEAD_IP,
                     "--local-workers", "1", "--drain-timeout", "2")
    terminal = Terminal(tmp_path / "head.log")
    head = terminal.start(args)
    pids, pgids = {head.pid}, set()
    try:
        s = tk.wait_every_node_state(control_port, "SERVING", SERVING_TIMEOUT)
        assert sorted(n["role"] for n in s["nodes"]) == ["head", "worker"]
        for n in s["nodes"]:
            pids.add(n["pid"])
            pgids.add(n["ray_pgid"])
        cluster = processes.tree(pids, pgids)
        assert len(cluster) >= 6  # two controllers, two Ray groups of several processes

        t0 = time.monotonic()
        terminal.close()
        assert head.wait(120) == 0, tk.ControllerProcess(args, terminal.log_path, head).stderr_tail()
        print(f"terminal closed -> head exited 0 after {time.monotonic() - t0:.1f}s")
        tk.wait_for(lambda: not processes.tree(cluster), 30, what="no process of the cluster left")
    finally:
        left = tk.stop_everything(pids, pgids)
    assert not left, f"processes left after the cluster: {sorted(left)}"


def lone_worker_args(ray_port: int, token_file: Path, drain_timeout: float) -> list[str]:
    return ["--role", "worker", "--head-address", f"{LONE_HEAD_IP}:{ray_port}",
            "--node-ip-address", LONE_WORKER_IP, "--log-format", "json", "--ray-token-file", str(token_file),
            "--drain-timeout", str(drain_timeout)]


@pytest.mark.parametrize("head_loss", ["controller", "node", "hung"])
def test_a_worker_whose_head_is_gone_stops_within_its_bound(tmp_path, head_loss):
    """SIGTERM to a worker whose head controller was SIGKILLed ends, exit 0, within the
    drain timeout, the release grace (the longest it waits for a head's release) and
    the fixed bound for stopping Ray, with nothing of the worker left; no head
    releases it, and it must not wait for one longer. `controller`: the head's
    Ray lives on, the coordinator answers. `node`: the head's Ray is gone too, every
    call to it fails (its raylet takes 10 s to exit on SIGTERM, ray.shutdown() 5 s).
    `hung`: the head's Ray is frozen (SIGSTOP), every call to it hangs, ray.shutdown()
    among them (the worker used to stay alive for minutes after its drain)."""
    drain_timeout = 1.0
    bound = drain_timeout + RELEASE_GRACE_S + STOP_BOUND_S + STUCK_CALLS_WAIT_S
    ray_port, control_port = tk.free_port(), tk.free_port()
    state = tmp_path / "state"
    head = tk.start_controller(head_args(ray_port, control_port, state, "--node-ip-address", LONE_HEAD_IP,
                                         "--expected-workers", "1"), tmp_path / "head.log", control_port=control_port)
    pids, pgids = {head.pid}, set()
    worker = None
    try:
        tk.wait_for((state / "ray-auth-token").exists, 30, 0.1, what="the head's Ray token")
        worker = tk.start_controller(lone_worker_args(ray_port, state / "ray-auth-token", drain_timeout),
                                     tmp_path / "worker.log")
        pids.add(worker.pid)
        s = tk.wait_every_node_state(control_port, "SERVING", SERVING_TIMEOUT)
        for n in s["nodes"]:
            pgids.add(n["ray_pgid"])
        head_node = next(n for n in s["nodes"] if n["role"] == "head")
        worker_node = next(n for n in s["nodes"] if n["role"] == "worker")
        assert worker_node["pid"] == worker.pid
        assert len(tk.node_pids(worker_node)) >= 3  # controller, raylet and its helpers

        if head_loss == "controller":
            os.kill(head.pid, signal.SIGKILL)
            head.wait(10)
            assert processes.tree(set(), {head_node["ray_pgid"]}), "the head's Ray lives on"
        elif head_loss == "node":
            tk.kill_node(head_node)
            head.wait(10)
        else:
            os.kill(head.pid, signal.SIGKILL)
            head.wait(10)
            processes.signal_all(tk.node_pids(head_node), signal.SIGSTOP)

        t0 = time.monotonic()
        worker.terminate()
        try:
            code = worker.wait(bound + 60)  # the bound itself is asserted below
        except subprocess.TimeoutExpired:
            pytest.fail(f"the worker still runs {bound + 60:g}s after SIGTERM:\n{worker.stderr_tail()}")
        took = time.monotonic() - t0
        left = tk.node_pids(worker_node)
        print(f"head {head_loss} gone: worker SIGTERM -> exit {code} after {took:.1f}s "
              f"(bound {bound:g}s)")
        assert code == 0, worker.stderr_tail()
        assert not left, f"the worker's processes left: {sorted(left)}"
        assert took <= bound, worker.stderr_tail()
        assert [e for e in worker.events() if e["event"] == "worker_left"]
    finally:
        # The head's Ray (alive unless the head node was killed), by its process group.
        processes.signal_all(processes.tree(set(), pgids), signal.SIGCONT)
        left = tk.stop_everything(pids | ({worker.pid} if worker else set()), pgids)
    assert not left, f"processes left: {sorted(left)}"
