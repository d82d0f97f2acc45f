"""A benchmark's own one-machine cluster: a head (and local workers) on
loopback addresses, recorded by pid and process group, always stopped.

    with BenchCluster(tmp, local_workers=1) as c:
        c.wait_state("SERVING", 600)
        ...
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from controller import testing as tk

HEAD_IP = "127.0.0.2"


class BenchCluster:
    def __init__(self, tmp: str | Path, *, local_workers: int = 0, engine: str = "vllm",
                 extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None, name: str = "head") -> None:
        self.tmp = Path(tmp)
        self.ray_port, self.control_port, self.serve_port = tk.free_port(), tk.free_port(), tk.free_port()
        self.args = ["--role", "head", "--node-ip-address", HEAD_IP, "--engine", engine,
                     "--local-workers", str(local_workers), "--ray-port", str(self.ray_port),
                     "--control-port", str(self.control_port), "--serve-port", str(self.serve_port),
                     "--log-format", "json", "--state-dir", str(self.tmp / f"{name}-state"), *extra_args]
        self.env = env
        self.name = name
        self.head: tk.ControllerProcess | None = None
        self.started_at: float | None = None  # time.time() just before the head was spawned
        self.workers: list[tk.ControllerProcess] = []
        self.pids: set[int] = set()
        self.pgids: set[int] = set()

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.serve_port}"

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    @property
    def head_address(self) -> str:
        return f"{HEAD_IP}:{self.ray_port}"

    def __enter__(self) -> "BenchCluster":
        self.started_at = time.time()
        self.head = tk.start_controller(self.args, self.tmp / f"{self.name}.log", env=self.env,
                                        control_port=self.control_port)
        self.pids.add(self.head.pid)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def status(self) -> dict[str, Any]:
        return tk.status(self.control_port)

    def record(self) -> dict[str, Any]:
        """Remember every node's processes from /status, for the cleanup."""
        s = self.status()
        for n in s["nodes"]:
            if n.get("pid"):
                self.pids.add(n["pid"])
            if n.get("ray_pgid"):
                self.pgids.add(n["ray_pgid"])
        return s

    def wait_state(self, state: str, timeout: float) -> dict[str, Any]:
        tk.wait_cluster_state(self.control_port, state, timeout)
        return self.record()

    def start_worker(self, ip: str) -> tk.ControllerProcess:
        """A new worker machine joining the cluster (its own loopback address)."""
        token = self.tmp / f"{self.name}-state" / "ray-auth-token"  # the head's, made at its start
        w = tk.start_controller(["--role", "worker", "--head-address", self.head_address, "--node-ip-address", ip,
                                 "--log-format", "json", "--join-delay", "2", "--ray-token-file", str(token)],
                                self.tmp / f"worker-{ip}.log", env=self.env)
        self.workers.append(w)
        self.pids.add(w.pid)
        return w

    def events(self) -> list[dict[str, Any]]:
        return self.head.events() if self.head else []

    def stop(self) -> set[int]:
        """SIGTERM the head (a drain), then stop whatever is left by pid and group."""
        if self.head is None:
            return set()
        try:
            self.record()
        except Exception:  # noqa: BLE001 - the head may be gone already; stop what was recorded
            pass
        left = tk.stop_head(self.head, self.pids | {w.pid for w in self.workers}, self.pgids)
        self.head = None
        return left
