"""Integration fixtures: real controllers, real Ray, loopback only.

Every process a test starts is recorded (controller pids, Ray process groups)
and stopped by pid/group at the end, whatever the outcome.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controller import processes
from controller import testing as tk

HEAD_IP = "127.0.0.2"
SERVING_TIMEOUT = 180


@dataclass
class Cluster:
    tmp: Path
    ray_port: int
    control_port: int
    head: tk.ControllerProcess
    args: list[str]
    started: list[tk.ControllerProcess] = field(default_factory=list)
    pids: set[int] = field(default_factory=set)
    pgids: set[int] = field(default_factory=set)

    @property
    def head_address(self) -> str:
        return f"{HEAD_IP}:{self.ray_port}"

    @property
    def token_file(self) -> Path:
        """The Ray token the head made in its state dir (unless a test gave it one)."""
        return self.tmp / "state" / "ray-auth-token"

    def worker_args(self, ip: str, *extra: str, token_file: Path | None = None) -> list[str]:
        if token_file is None:  # the head's own: it makes it within a second of its start
            tk.wait_for(self.token_file.exists, 30, 0.1, what=f"the head's Ray token at {self.token_file}")
        return ["--role", "worker", "--head-address", self.head_address, "--node-ip-address", ip,
                "--log-format", "json", "--ray-token-file", str(token_file or self.token_file), *extra]

    def status(self) -> dict:
        return tk.status(self.control_port)

    def record(self) -> dict:
        """Remember every node's processes from /status, for the final check and cleanup."""
        s = self.status()
        for n in s["nodes"]:
            if n.get("pid"):
                self.pids.add(n["pid"])
            if n.get("ray_pgid"):
                self.pgids.add(n["ray_pgid"])
        return s

    def start(self, args: list[str], name: str, control_port: int | None = None,
              env: dict[str, str] | None = None) -> tk.ControllerProcess:
        p = tk.start_controller(args, self.tmp / f"{name}.log", env=env, control_port=control_port)
        self.started.append(p)
        self.pids.add(p.pid)
        return p

    def leftovers(self) -> set[int]:
        return processes.tree(self.pids | {p.pid for p in self.started}, self.pgids)

    def cleanup(self) -> set[int]:
        for p in self.started:
            p.terminate()
        deadline = time.monotonic() + 60
        for p in self.started:
            try:
                p.wait(max(1.0, deadline - time.monotonic()))
            except Exception:
                pass
        return tk.stop_everything(self.pids | {p.pid for p in self.started}, self.pgids)


def head_args(ray_port: int, control_port: int, state_dir: Path, *extra: str) -> list[str]:
    return ["--role", "head", "--ray-port", str(ray_port), "--control-port", str(control_port),
            "--log-format", "json", "--state-dir", str(state_dir), "--engine", "none",
            "--serve-port", str(tk.free_port()), *extra]


def start_cluster(tmp: Path, local_workers: int = 2, extra: tuple[str, ...] = (),
                  env: dict[str, str] | None = None) -> Cluster:
    ray_port, control_port = tk.free_port(), tk.free_port()
    args = head_args(ray_port, control_port, tmp / "state", "--local-workers", str(local_workers), *extra)
    cluster = Cluster(tmp=tmp, ray_port=ray_port, control_port=control_port, head=None, args=args)  # type: ignore[arg-type]
    cluster.head = cluster.start(args, "head", control_port, env=env)
    return cluster


def serving_cluster(tmp: Path, timeout: float, extra: tuple[str, ...] = (), local_workers: int = 2,
                    env: dict[str, str] | None = None) -> Cluster:
    """A head + local workers, waited to SERVING; stopped again if it never gets there."""
    c = start_cluster(tmp, local_workers=local_workers, extra=extra, env=env)
    try:
        tk.wait_cluster_state(c.control_port, "SERVING", timeout)
        c.record()
    except Exception:
        print(c.head.stderr_tail(40))
        c.cleanup()
        raise
    return c


def stop_cluster(c: Cluster, *workers: tk.ControllerProcess) -> None:
    """SIGTERM to the head: it and the given workers must exit 0 on their own, and
    nothing of the test may be left."""
    c.head.terminate()
    assert c.head.wait(180) == 0
    for worker in workers:
        assert worker.wait(60) == 0
    tk.wait_for(lambda: not c.leftovers(), 30, what="no process of the test left")
    left = c.cleanup()
    assert not left, f"processes left after the cluster: {sorted(left)}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head + 2 local workers, `--engine none`, SERVING. Shared by one module's tests,
    the last of which stops it (by SIGTERM) and checks what is left."""
    c = serving_cluster(tmp_path_factory.mktemp("cluster"), SERVING_TIMEOUT)
    yield c
    left = c.cleanup()
    assert not left, f"processes left after the cluster fixture: {sorted(left)}"

