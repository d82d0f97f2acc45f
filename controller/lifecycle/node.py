"""What every node does, whatever its role: tracked tasks, the Ray adapter, the
epoch it lives in, and reporting its transitions to the coordinator in order."""

from __future__ import annotations

import asyncio
import os
import platform
from typing import Any

from controller.cluster.coordinator import CoordinatorClient, StaleEpoch
from controller.cluster.ray_adapter import RayAdapter
from controller.cluster.records import Member
from controller.config import Config
from controller.lifecycle.loop import Board
from controller.lifecycle.tasks import TaskSet
from controller.logs import log
from states import Moved, State

REPORT_RETRY_S = (0.5, 5.0)  # first and longest wait between tries of one report


class NodeBase:
    """Handed its dependencies: the configuration, the board it shares with the
    loop, the Ray adapter and the loop's clock."""

    def __init__(self, config: Config, board: Board, ray: RayAdapter) -> None:
        self.config = config
        self.board = board
        self.clock = board.clock
        self.ray = ray
        self.coordinator: CoordinatorClient | None = None
        self.tasks = TaskSet(self._task_failed)
        self.ray_node_id: str | None = None
        self.state = State.INIT
        self._reports: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        # Transitions queued and transitions done with (told, or given up on):
        # flushing waits for the second to reach the first.
        self._queued = self._settled = 0
        self._settled_event = asyncio.Event()
        self._shutdown_done = False
        self._epoch: int | None = None

    def epoch(self) -> int | None:
        """The epoch this node is in; kept after the coordinator is gone, for the last logs."""
        if self.coordinator is not None:
            self._epoch = self.coordinator.epoch
        return self._epoch

    def on_moved(self, moved: Moved, record: dict[str, Any]) -> None:
        self.state = moved.dest
        self._queued += 1
        self._reports.put_nowait((moved.dest.value, record))

    def _task_failed(self, name: str, exc: BaseException) -> None:
        raise NotImplementedError

    def member_info(self, role: str, address: str | None, **more: Any) -> Member:
        return Member(node_id=self.config.node_id, role=role, ray_node_id=self.ray_node_id, address=address,
                      pid=os.getpid(), ray_pgid=self.ray.node.pgid if self.ray.node else None,
                      ray_version=self.ray.ray_version(), python_version=platform.python_version(), **more)

    async def _report_loop(self) -> None:
        """Send this node's transitions to the coordinator, in order."""
        while True:
            state, record = await self._reports.get()
            try:
                await self._report(state, record)
            finally:
                self._settled += 1
                self._settled_event.set()

    async def _report(self, state: str, record: dict[str, Any]) -> None:
        """Tell the coordinator, retrying (in order: the next waits) while it does not
        answer: a transition lost here would be missing from the cluster's history
        and counts for good. Given up when the coordinator is another (a rejoin, a
        new epoch) or refuses the epoch."""
        coordinator = await self._report_target()
        if coordinator is None:
            return  # no coordinator to tell: the log line is the record
        transition = {k: record[k] for k in ("from", "to", "trigger", "reason")}
        wait = REPORT_RETRY_S[0]
        while True:
            try:
                await coordinator.report(self.config.node_id, state, transition)
                return
            except StaleEpoch as exc:
                log.warning("coordinator_report_dropped", state=state, error=str(exc))
                return
            except Exception as exc:
                log.warning("coordinator_report_failed", state=state, retry_in_s=wait,
                            error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(wait)
            wait = min(wait * 2, REPORT_RETRY_S[1])
            if self.coordinator is not coordinator:
                log.warning("coordinator_report_dropped", state=state, error="the coordinator changed")
                return

    async def _report_target(self) -> CoordinatorClient | None:
        return self.coordinator

    async def flush_reports(self, timeout: float) -> None:
        """Wait, at most `timeout`, until every transition so far reached the coordinator
        (or failed to): what the coordinator says then includes this node's last move."""
        end = self.clock() + timeout
        while self._settled < self._queued and (left := end - self.clock()) > 0:
            self._settled_event.clear()
            try:
                await asyncio.wait_for(self._settled_event.wait(), left)
            except asyncio.TimeoutError:
                return
