"""The head's Ray: start a new Ray head (a new cluster epoch, a new coordinator),
or re-attach to the live one that a previous head controller of this node left."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Callable

from controller import processes
from controller.cluster import ray_token
from controller.cluster.coordinator import ACTOR_NAME, CoordinatorClient
from controller.cluster.ray_adapter import HEALTH_CHECK_PRESETS, RayAdapter, RayError
from controller.config import Config
from controller.errors import FatalError
from controller.logs import log

RAY_START_TIMEOUT = 60.0
STALE_GCS_WAIT_S = 90.0
CONNECT_TIMEOUT_S = 30.0


def next_epoch(state_dir: str) -> int:
    """Read, increment and persist the cluster epoch (one per new Ray head)."""
    path = Path(state_dir) / "epoch"
    try:
        last = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        last = 0
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{last + 1}\n")
    os.replace(tmp, path)
    return last + 1


class RayHead:
    def __init__(self, config: Config, ray: RayAdapter, object_store: int) -> None:
        self.config = config
        self.ray = ray
        self.object_store = object_store
        self.address = config.node_ip_address  # learnt from Ray when not given
        self.ray_node_id: str | None = None

    @property
    def gcs_address(self) -> str:
        return f"{self.address or '127.0.0.1'}:{self.config.ray_port}"

    async def bring_up(self) -> CoordinatorClient:
        """A coordinator to work with: a new cluster's, or the live one's (re-attach)."""
        if self.ray.port_free(self.address, self.config.ray_port):
            return await self._start_new_cluster()
        return await self._reattach()

    async def _start_new_cluster(self) -> CoordinatorClient:
        cfg = self.config
        log.info("ray_head_starting", port=cfg.ray_port, node_ip=self.address,
                 object_store_bytes=self.object_store, health_check=cfg.ray_health_check)
        args = ["--head", "--port", str(cfg.ray_port), "--object-store-memory", str(self.object_store),
                "--dashboard-host", "127.0.0.1"]
        await self._ray_start_head(args)
        await self.ray.connect(self.gcs_address, timeout=CONNECT_TIMEOUT_S)
        self.ray_node_id = self.ray.ray_node_id()
        if self.address is None:
            self.address = await self._own_address()
        coordinator = await CoordinatorClient.create_or_attach(self.ray, next_epoch(cfg.state_dir), self.ray_node_id)
        log.info("coordinator_created", actor=ACTOR_NAME, epoch=coordinator.epoch)
        return coordinator

    async def _ray_start_head(self, args: list[str]) -> None:
        """`ray start --head`, waiting out the Ray processes of a dead head's nodes.

        Ray refuses a head at an address that any local process still names as its
        GCS. On one machine, the nodes of a head that just died still do so for up
        to ~30 s, until their raylets notice the GCS is gone and exit.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STALE_GCS_WAIT_S
        while True:
            try:
                await self.ray.start(args, RAY_START_TIMEOUT, env=HEALTH_CHECK_PRESETS[self.config.ray_health_check])
                return
            except RayError as exc:
                if "is already running at" not in str(exc) or loop.time() >= deadline:
                    raise
                log.warning("ray_head_address_still_named", error=str(exc), retry_in_s=5)
                await asyncio.sleep(5)

    async def _reattach(self) -> CoordinatorClient:
        """The Ray port is taken: our own Ray head left by a previous controller, or not ours."""
        cfg = self.config
        error = await self.ray.cli_health_check(self.gcs_address, timeout=10.0)
        if error and ray_token.is_refusal(error):
            raise FatalError(f"a Ray head already runs at {self.gcs_address} and refuses this controller's Ray "
                             "token: another cluster's head, or this one's started with another token "
                             "(--ray-token-file, LLMCTL_RAY_TOKEN, or STATE_DIR/ray-auth-token)")
        if error:
            raise FatalError(f"Ray port {cfg.ray_port} on {self.address or '0.0.0.0'} is in use "
                             f"by something that is not a Ray head ({error})")
        await self.ray.connect(self.gcs_address, timeout=CONNECT_TIMEOUT_S)
        try:
            coordinator = await CoordinatorClient.attach(self.ray)
        except LookupError:
            raise FatalError(f"a Ray head already runs at {self.gcs_address} without a coordinator: "
                             "it is not ours; stop it or pick another --ray-port") from None
        snap = await coordinator.snapshot()
        head = snap.head()
        if head and head.pid and head.pid != os.getpid() and processes.is_running(head.pid) \
                and head.address == self.address:
            raise FatalError(f"another head controller (pid {head.pid}) already runs the cluster "
                             f"at {self.gcs_address}")
        if head is None or head.address != self.address:
            raise FatalError(f"the Ray head at {self.gcs_address} belongs to another node")
        self.ray_node_id = self.ray.ray_node_id()
        if head.ray_pgid:
            self.ray.adopt(head.ray_pgid)
        log.info("coordinator_reattached", epoch=coordinator.epoch, previous_pid=head.pid,
                 members=len(snap.members))
        return coordinator

    async def wait_workers_gone(self, remaining: Callable[[], float]) -> None:
        """Wait until no other Ray node is alive, while `remaining()` is above 0."""
        while remaining() > 0:
            try:
                others = [n for n in await self.ray.alive_nodes() if n["NodeID"] != self.ray_node_id]
            except RayError as exc:
                log.warning("drain_wait_failed", error=str(exc))
                return
            if not others:
                log.info("workers_gone")
                return
            await asyncio.sleep(0.5)
        log.warning("drain_timeout_workers_remain")

    async def _own_address(self) -> str:
        for node in await self.ray.alive_nodes():
            if node["NodeID"] == self.ray_node_id:
                return node["NodeManagerAddress"]
        raise FatalError("the Ray head does not list its own node")
