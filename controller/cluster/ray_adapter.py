"""Every call into Ray lives here: `ray start`, `ray.init`, `ray.nodes()`,
`ray health-check`, `ray.shutdown()`, stopping this node's Ray processes, and
actors (create, find, call with a timeout, kill).

No other module imports `ray`. The actor classes (controller/cluster/
coordinator.py's `Coordinator`, controller/engines/replica.py's `ReplicaActor`)
are imported by Ray on the nodes that run them, but they do not call Ray
themselves. `RayAdapter` is handed to every object that needs Ray (the node,
the coordinator client, the replica set, the monitors), so a unit test can hand
them a fake instead (tests/unit/fakes.py).

Blocking Ray calls run in threads under our own timeouts, so the event loop
never blocks and no call waits without a bound.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller import processes
from controller.logs import log

NAMESPACE = "llm-controller"
GIB = 1024**3

# Ray's node failure detection, set in the environment of the head's `ray start`.
# Ray's defaults (first check after 5 s, every 3 s, 10 s timeout, 5 misses) take
# about 13 s to see a killed node and about 63 s for a hung one. The controller's
# choice: every 1 s, 2 s timeout, 5 misses: a killed node in about 5 s, a hung one
# in about 15 s, while a node whose cores are saturated by engines still has
# five chances, each two seconds long, to answer.
HEALTH_CHECK_PRESETS: dict[str, dict[str, str]] = {
    "ray": {},
    "controller": {
        "RAY_health_check_initial_delay_ms": "5000",
        "RAY_health_check_period_ms": "1000",
        "RAY_health_check_timeout_ms": "2000",
        "RAY_health_check_failure_threshold": "5",
    },
}

# A driver whose GCS is gone for this long exits its whole process (Ray's default
# is 60 s). The controller must outlive its head to report and rejoin, so its own
# driver waits longer; the daemons it starts keep Ray's default.
# Ray's C++ failure-signal handler in a driver catches SIGTERM, prints a stack
# and aborts the process: the controller handles SIGTERM itself (it drains).
_DRIVER_ENV = {
    "RAY_gcs_rpc_server_reconnect_timeout_s": str(7 * 24 * 3600),
    "RAY_DISABLE_FAILURE_SIGNAL_HANDLER": "1",
    # A Ray call after ray.shutdown() must fail, not silently start a new cluster
    # (or block the event loop connecting to one that is gone).
    "RAY_ENABLE_AUTO_CONNECT": "0",
}


def prepare_driver_env() -> None:
    """Call before `import ray` in the controller process."""
    os.environ.update(_DRIVER_ENV)


class RayError(RuntimeError):
    """A Ray operation failed; the message says which and why."""


def object_store_bytes(available_memory: int, shm_size: int, nodes_on_machine: int = 1) -> int:
    """min(30% of available memory, /dev/shm, 200 GB), shared by the nodes on one machine."""
    size = min(int(available_memory * 0.3), shm_size, 200 * 10**9)
    return max(size // max(1, nodes_on_machine), 78 * 1024 * 1024)


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RayError("cannot read MemAvailable from /proc/meminfo")


def shm_size(path: str = "/dev/shm") -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_blocks * st.f_frsize


def ray_cli() -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts"]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for processes we start: without the driver-only overrides."""
    env = {k: v for k, v in os.environ.items() if k not in _DRIVER_ENV}
    env.update(extra or {})
    return env


def tcp_answers(host: str, port: int, timeout: float = 2.0) -> str | None:
    """None when something accepts TCP at host:port, else the error text."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def port_free(host: str | None, port: int) -> bool:
    """True unless something listens on host:port. SO_REUSEADDR, as servers (Ray's
    GCS among them) use it: connections of a dead server in TIME_WAIT do not count."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "0.0.0.0", port))
        except OSError:
            return False
    return True


@dataclass
class RayNode:
    """This node's Ray daemons: the process group `ray start` made."""

    pgid: int
    started_here: bool


class RayAdapter:
    def __init__(self, node_ip: str | None, call_timeout: float = 10.0) -> None:
        self.node_ip = node_ip
        self.call_timeout = call_timeout
        self.node: RayNode | None = None
        self.connected = False

    # -- starting and stopping this node's Ray daemons ------------------------------

    async def start(self, args: list[str], timeout: float, env: dict[str, str] | None = None) -> RayNode:
        """Run `ray start ARGS` bounded by `timeout`; the daemons stay in its process group."""
        cmd = ray_cli() + ["start", "--disable-usage-stats", *args]
        if self.node_ip:
            cmd += ["--node-ip-address", self.node_ip]
        proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=child_env(env),
            # Its own process group, which Ray's daemons inherit: the node's Ray
            # processes can then be found and stopped as one group.
            start_new_session=True,
        )
        # This node's from the moment it exists: a start that is cancelled (a drain
        # while joining) leaves daemons that stop_node() then stops with the rest.
        node = self.node = RayNode(pgid=proc.pid, started_here=True)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            await asyncio.to_thread(self._stop_group, node.pgid, 5.0)
            self.node = None
            raise RayError(f"`ray start` did not finish within {timeout:g}s") from None
        if proc.returncode != 0:
            await asyncio.to_thread(self._stop_group, node.pgid, 5.0)
            self.node = None
            raise RayError(f"`ray start` failed (exit {proc.returncode}): {_last_line(out)}")
        log.info("ray_started", pgid=node.pgid, args=args)
        return node

    def adopt(self, pgid: int) -> None:
        """Take over a Ray node a previous controller of this node started."""
        self.node = RayNode(pgid=pgid, started_here=False)

    async def stop_node(self, grace: float = 10.0) -> set[int]:
        """Stop this node's Ray processes (like `ray stop`, but only ours, by process group)."""
        if self.node is None:
            return set()
        left = await asyncio.to_thread(self._stop_group, self.node.pgid, grace)
        self.node = None
        return left

    @staticmethod
    def _stop_group(pgid: int, grace: float) -> set[int]:
        return processes.terminate(processes.tree(pgids={pgid}), grace)

    # -- the driver connection -------------------------------------------------------

    async def connect(self, address: str, timeout: float) -> None:
        prepare_driver_env()
        import ray

        def _init() -> None:
            ray.init(
                address=address,
                namespace=NAMESPACE,
                _node_ip_address=self.node_ip,
                logging_level="WARNING",
                log_to_driver=False,
                configure_logging=False,
            )

        await self._bounded(_init, timeout, "ray.init")
        self.connected = True

    async def disconnect(self, timeout: float = 10.0) -> None:
        import ray

        if not self.connected:
            return
        self.connected = False
        try:
            await self._bounded(ray.shutdown, timeout, "ray.shutdown")
        except RayError as exc:
            log.warning("ray_shutdown_failed", error=str(exc))

    def ray_node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    @staticmethod
    def ray_version() -> str:
        import ray

        return ray.__version__

    # -- actors ------------------------------------------------------------------------

    def create_actor(self, cls: type, *args: Any, name: str, node_id: str, max_concurrency: int,
                     **kwargs: Any) -> Any:
        """A named, detached actor of `cls` pinned to the Ray node `node_id`, or the
        live actor of that name. Returns its handle at once; creation goes on in Ray."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        return ray.remote(cls).options(
            name=name, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=0, max_restarts=0, max_concurrency=max_concurrency,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
        ).remote(*args, **kwargs)

    async def get_actor(self, name: str, timeout: float) -> Any:
        """The live actor named `name`; LookupError when there is none."""
        import ray

        try:
            return await asyncio.wait_for(
                asyncio.to_thread(ray.get_actor, name, namespace=NAMESPACE), timeout)
        except ValueError:
            raise LookupError(f"no actor named {name}") from None

    @staticmethod
    async def call(handle: Any, method: str, *args: Any, timeout: float) -> Any:
        """`handle.method(*args)`, awaited for at most `timeout` (asyncio.TimeoutError).
        The actor's own exceptions come back as they are (Ray's error subclasses them)."""
        return await asyncio.wait_for(getattr(handle, method).remote(*args), timeout)

    @staticmethod
    def fire(handle: Any, method: str, *args: Any) -> None:
        """Start `handle.method(*args)` without waiting for its answer."""
        getattr(handle, method).remote(*args)

    async def kill_actor(self, handle: Any) -> None:
        """End an actor (detached ones outlive their creator otherwise); never raises."""
        import ray

        try:
            await self._bounded(lambda: ray.kill(handle, no_restart=True), self.call_timeout, "ray.kill")
        except RayError as exc:
            log.warning("actor_kill_failed", error=str(exc))

    async def nodes(self) -> list[dict[str, Any]]:
        """All nodes Ray knows, dead ones included (their `Alive` is False)."""
        import ray

        return await self._bounded(ray.nodes, self.call_timeout, "ray.nodes")

    async def cluster_resources(self) -> dict[str, float]:
        """The cluster's total resources (CPU, GPU, memory, ...)."""
        import ray

        return await self._bounded(ray.cluster_resources, self.call_timeout, "ray.cluster_resources")

    async def alive_nodes(self) -> list[dict[str, Any]]:
        return [n for n in await self.nodes() if n.get("Alive")]

    @staticmethod
    async def address_refuses(host: str, port: int, timeout: float = 2.0) -> str | None:
        """None when something accepts TCP at host:port (a Ray head's GCS), else why not."""
        return await asyncio.to_thread(tcp_answers, host, port, timeout)

    @staticmethod
    def port_free(host: str | None, port: int) -> bool:
        """True unless something listens on host:port (the Ray head's port)."""
        return port_free(host, port)

    @staticmethod
    async def raylet_refuses(node: dict[str, Any], timeout: float) -> str | None:
        """None when the raylet of `node` (an entry of `nodes()`) accepts a TCP
        connection, else why not: a node whose processes died refuses at once,
        long before Ray's own health checks declare it dead."""
        return await RayAdapter.address_refuses(node["NodeManagerAddress"], node["NodeManagerPort"], timeout)

    async def cli_health_check(self, address: str, timeout: float = 5.0) -> str | None:
        """`ray health-check`: None when the GCS at `address` answers, else why not.

        It costs over a second of CPU and hangs ~40 s on a dead GCS: run it rarely,
        under our own timeout.
        """
        proc = await asyncio.create_subprocess_exec(
            *ray_cli(), "health-check", "--address", address,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=child_env(),
            start_new_session=True,
        )
        try:
            _, err = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            await asyncio.to_thread(processes.terminate, processes.tree(roots={proc.pid}), 1.0)
            await proc.wait()
            return f"`ray health-check --address {address}` did not answer within {timeout:g}s"
        except asyncio.CancelledError:
            # It runs in a session of its own and hangs ~40 s on a dead GCS: not left behind.
            processes.signal_all(processes.tree(roots={proc.pid}), signal.SIGKILL)
            raise
        if proc.returncode != 0:
            return f"`ray health-check --address {address}` failed: {_last_line(err) or proc.returncode}"
        return None

    async def _bounded(self, fn, timeout: float, what: str):
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn), timeout)
        except asyncio.TimeoutError:
            raise RayError(f"{what} did not return within {timeout:g}s") from None
        except RayError:
            raise
        except Exception as exc:  # Ray raises many types; keep the cause in the text.
            raise RayError(f"{what} failed: {type(exc).__name__}: {exc}") from exc


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _last_line(output: bytes | None) -> str:
    """The line that explains a failure: the last one naming an error, else the last."""
    text = _ANSI.sub("", (output or b"").decode(errors="replace"))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errors or lines or [""])[-1]
