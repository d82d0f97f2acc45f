"""Health and node-count monitors. Each observes one signal and writes the board;
none of them changes a state. The loop decides."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any, Callable

from controller.cluster.coordinator import CoordinatorClient, StaleEpoch
from controller.cluster.records import GONE_STATES, Desired, Info
from controller.logs import log
from controller.lifecycle.loop import Board
from controller.cluster.ray_adapter import RayAdapter
from states import State


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"


def clock_time_of(iso: str | None, clock: Callable[[], float]) -> float:
    """The `clock` reading for a wall-clock ISO timestamp (now, when there is none)."""
    now = clock()
    if not iso:
        return now
    try:
        wall = datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return now
    return now - max(0.0, time.time() - wall)


def _state_or_none(value: Any) -> State | None:
    try:
        return State(value)
    except ValueError:
        return None


class ClusterMonitor:
    """Head: alive Ray nodes (GCS answering in-process) and registered workers.
    Writes the board's `alive_nodes` and `registered_workers`, and marks members
    whose Ray node died as lost in the coordinator."""

    def __init__(self, ray: RayAdapter, coordinator: CoordinatorClient, board: Board,
                 clock: Callable[[], float]) -> None:
        self.ray = ray
        self.coordinator = coordinator
        self.board = board
        self.clock = clock
        self.alive_ids: set[str] = set()

    async def check(self) -> None:
        try:
            nodes = await self.ray.nodes()
        except Exception as exc:
            self.board.health("gcs", f"ray.nodes(): {_error_text(exc)}")
            return
        self.board.health("gcs", None)
        alive = [n for n in nodes if n.get("Alive")]  # dead nodes stay listed
        self.alive_ids = {n["NodeID"] for n in alive}
        try:
            snap = await self.coordinator.snapshot()
        except Exception as exc:
            self.board.set(alive_nodes=len(alive))
            self.board.health("coordinator", f"coordinator: {_error_text(exc)}")
            return
        lost_members = [m for m in snap.members if m.alive and m.ray_node_id not in self.alive_ids]
        for m in lost_members:
            # Noted before the count changes, so the transition it causes can tell how
            # long detection took: from the lost node's last heartbeat.
            self.board.note_fault("node_lost", clock_time_of(m.last_seen, self.clock))
        self.board.set(alive_nodes=len(alive))
        self.board.health("coordinator", None)
        lost = [m.node_id for m in lost_members]
        if lost:
            log.warning("members_lost", node_ids=lost)
            await self.coordinator.mark_lost(lost)
        workers = [m for m in snap.members
                   if m.role == "worker" and m.alive and m.node_id not in lost and m.state not in GONE_STATES]
        self.board.set(registered_workers=len(workers))


class GcsCliMonitor:
    """`ray health-check` against the head's GCS: an out-of-process second opinion."""

    def __init__(self, ray: RayAdapter, address: str, board: Board, clock: Callable[[], float]) -> None:
        self.ray = ray
        self.address = address
        self.board = board
        self.clock = clock

    async def check(self) -> None:
        started = self.clock()
        error = await self.ray.cli_health_check(self.address)
        self.board.health("gcs_cli", error)
        # "Reachable again" only counts when the GCS answered after the coordinator
        # stopped answering: an older success says nothing about a new cluster.
        doubt = self.board.failing_since("coordinator")
        self.board.set(head_reachable=error is None and doubt is not None and started > doubt)
        if error:
            log.warning("gcs_health_check_failed", address=self.address, error=error)


class CoordinatorWatch:
    """Worker: heartbeat the coordinator and long-poll it for cluster changes."""

    def __init__(self, coordinator: CoordinatorClient, board: Board, node_id: str) -> None:
        self.coordinator = coordinator
        self.board = board
        self.node_id = node_id
        self.version = -1

    def _apply(self, info: Info) -> None:
        self.board.set(cluster_state=_state_or_none(info.cluster_state), cluster_epoch=info.epoch,
                       cluster_draining=info.desired is Desired.DRAIN)

    async def heartbeat(self) -> None:
        try:
            info = await self.coordinator.heartbeat(self.node_id)
        except StaleEpoch as exc:
            self.board.health("coordinator", None)
            self.board.set(cluster_epoch=exc.current)
            return
        except Exception as exc:
            self.board.health("coordinator", f"coordinator heartbeat: {_error_text(exc)}")
            return
        self.board.health("coordinator", None)
        self.board.set(fenced=bool(info.member_lost))
        self._apply(info)

    async def watch(self, poll_timeout: float = 10.0) -> None:
        """One long-poll round: returns when something changed or after `poll_timeout`."""
        info = await self.coordinator.wait_for_change(self.version, poll_timeout)
        self.version = info.version
        self._apply(info)
