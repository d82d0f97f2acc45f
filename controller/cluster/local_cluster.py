"""`--local-workers N`: worker nodes on the head's machine, one real raylet each.

Each worker is a `python -m controller --role worker` child in a session of its
own (so it is killable as one node, and the head's Ctrl-C reaches it only
through the ordered drain), with its own loopback address as its Ray node IP.
"""

from __future__ import annotations

import asyncio
import ipaddress
import subprocess
import sys
from typing import Callable

from controller import processes
from controller.cluster.coordinator import CoordinatorClient
from controller.cluster.records import Member
from controller.config import ENV_PREFIX, Config
from controller.errors import FatalError
from controller.logs import log
from controller.cluster.ray_adapter import child_env


def local_worker_addresses(head_ip: str, count: int) -> list[str]:
    """The addresses after the head's: 127.0.0.2 -> 127.0.0.3, 127.0.0.4, ..."""
    base = ipaddress.ip_address(head_ip)
    return [str(base + i) for i in range(1, count + 1)]


def local_worker_argv(config: Config, address: str, object_store_bytes: int) -> list[str]:
    assert config.node_ip_address is not None
    return [
        sys.executable, "-m", "controller",
        "--role", "worker",
        "--head-address", f"{config.node_ip_address}:{config.ray_port}",
        "--node-ip-address", address,
        "--log-format", config.log_format,
        "--join-attempts", str(config.join_attempts),
        "--join-delay", str(min(config.join_delay, 2.0)),
        "--join-attempt-timeout", str(config.join_attempt_timeout),
        "--health-interval", str(config.health_interval),
        "--health-cli-interval", str(config.health_cli_interval),
        "--failure-threshold", str(config.failure_threshold),
        "--drain-timeout", str(config.drain_timeout),
        "--degraded-timeout", str(config.degraded_timeout),
        "--tick-interval", str(config.tick_interval),
        "--engine", config.engine,
        "--object-store-memory", str(object_store_bytes),
    ]


def ray_auth_args(env: dict[str, str]) -> list[str]:
    """The head's Ray token, handed to a local worker the way it reached the head
    (a file by its path; a token from the environment through the environment)."""
    if env.get("RAY_AUTH_MODE") != "token":
        return ["--ray-auth", "none"]
    if env.get("RAY_AUTH_TOKEN_PATH"):
        return ["--ray-token-file", env["RAY_AUTH_TOKEN_PATH"]]
    env[ENV_PREFIX + "RAY_TOKEN"] = env["RAY_AUTH_TOKEN"]
    return []


class LocalWorkers:
    def __init__(self, config: Config, object_store_bytes: int,
                 spawn: Callable[..., subprocess.Popen] = subprocess.Popen) -> None:
        self.config = config
        self.spawn = spawn  # how a worker process starts (a unit test hands in a fake)
        self.started = False  # start_all() was begun (once per head)
        self.object_store_bytes = object_store_bytes
        self.addresses = (
            local_worker_addresses(config.node_ip_address, config.local_workers)
            if config.local_workers and config.node_ip_address else []
        )
        self.children: dict[str, subprocess.Popen] = {}
        self.adopted: dict[str, int] = {}  # address -> controller pid of a worker we did not start

    def pids(self) -> set[int]:
        return {p.pid for p in self.children.values()} | set(self.adopted.values())

    async def start_all(self, coordinator: CoordinatorClient, join_timeout: float) -> None:
        """Start (or adopt) every local worker, one at a time: raylets started together
        on one machine race for the same random ports (seen here: "bind: Address
        already in use" in the raylet). Each waits, bounded, until it has joined."""
        loop = asyncio.get_running_loop()
        for address in self.addresses:
            members = None
            deadline = loop.time() + join_timeout
            while members is None:
                members = await self._members_or_none(coordinator)
                if members is None:
                    if loop.time() >= deadline:
                        raise FatalError(f"the coordinator did not answer for {join_timeout:g}s "
                                         f"while starting the local worker {address}")
                    await asyncio.sleep(1.0)
            if not self.start_one(address, members):
                continue
            deadline = loop.time() + join_timeout
            while loop.time() < deadline:
                members = await self._members_or_none(coordinator)
                if members and any(m.address == address and m.alive for m in members):
                    break
                await asyncio.sleep(0.5)

    @staticmethod
    async def _members_or_none(coordinator: CoordinatorClient) -> list[Member] | None:
        """The coordinator's members, or None when it does not answer this time: a
        slow or paused coordinator is the health monitors' business, not a reason to
        stop starting local workers."""
        try:
            return (await coordinator.snapshot()).members
        except Exception as exc:
            log.warning("local_workers_wait", error=f"{type(exc).__name__}: {exc}")
            return None

    def start_one(self, address: str, members: list[Member]) -> bool:
        """Start the worker for `address` unless it runs; adopt a live one (a restarted head).

        Returns True when a new process was started.
        """
        if address in self.children or address in self.adopted:
            return False
        member = next((m for m in members if m.address == address and m.role == "worker"
                       and m.alive and m.pid), None)
        if member is not None and processes.is_running(member.pid):
            self.adopted[address] = member.pid
            log.info("local_worker_adopted", address=address, pid=member.pid)
            return False
        env = {k: v for k, v in child_env().items() if not k.startswith(ENV_PREFIX)}
        argv = local_worker_argv(self.config, address, self.object_store_bytes) + ray_auth_args(env)
        proc = self.spawn(argv, env=env, start_new_session=True, stdin=subprocess.DEVNULL)
        self.children[address] = proc
        log.info("local_worker_started", address=address, pid=proc.pid)
        return True

    async def stop(self, members: list[Member], grace: float) -> set[int]:
        """Wait up to `grace` for the workers to finish their own drain, then stop
        whatever is left of them (controller and Ray processes) by pid and group."""
        pids = self.pids()
        left = await asyncio.to_thread(processes.wait_gone, pids, grace)
        groups = {m.ray_pgid for m in members if m.address in self.addresses and m.ray_pgid}
        leftovers = await asyncio.to_thread(processes.tree, left, groups)
        if leftovers:
            log.warning("local_workers_forced", pids=sorted(leftovers))
            leftovers = await asyncio.to_thread(processes.terminate, leftovers, 5.0)
        for proc in self.children.values():
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        return leftovers
