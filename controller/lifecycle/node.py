"""What every node does, whatever its role: tracked tasks, the Ray adapter, the
epoch it lives in, and reporting its transitions to the coordinator in order."""

from __future__ import annotations

import asyncio
import os
import platform
from typing import Any

from controller.config import Config
from controller.cluster.coordinator import CoordinatorClient
from controller.logs import log
from controller.lifecycle.loop import Board
from controller.cluster.ray_adapter import RayAdapter
from controller.lifecycle.tasks import TaskSet
from states import Moved, State


class NodeBase:
    def __init__(self, config: Config, board: Board) -> None:
        self.config = config
        self.board = board
        self.ray = RayAdapter(config.node_ip_address)
        self.coordinator: CoordinatorClient | None = None
        self.tasks = TaskSet(self._task_failed)
        self.ray_node_id: str | None = None
        self.state = State.INIT
        self._reports: asyncio.Queue[tuple[str, dict[str, Any]]] = asyncio.Queue()
        self._shutdown_done = False
        self._epoch: int | None = None

    def epoch(self) -> int | None:
        """The epoch this node is in; kept after the coordinator is gone, for the last logs."""
        if self.coordinator is not None:
            self._epoch = self.coordinator.epoch
        return self._epoch

    def on_moved(self, moved: Moved, record: dict[str, Any]) -> None:
        self.state = moved.dest
        self._reports.put_nowait((moved.dest.value, record))

    def _task_failed(self, name: str, exc: BaseException) -> None:
        raise NotImplementedError

    def member_info(self, role: str, address: str | None) -> dict[str, Any]:
        import ray

        return {"node_id": self.config.node_id, "role": role, "ray_node_id": self.ray_node_id,
                "address": address, "pid": os.getpid(),
                "ray_pgid": self.ray.node.pgid if self.ray.node else None,
                "ray_version": ray.__version__, "python_version": platform.python_version()}

    async def _report_loop(self) -> None:
        """Send this node's transitions to the coordinator, in order."""
        while True:
            state, record = await self._reports.get()
            coordinator = await self._report_target()
            if coordinator is None:
                continue  # no coordinator to tell: the log line is the record
            transition = {k: record[k] for k in ("from", "to", "trigger", "reason")}
            try:
                await coordinator.report(self.config.node_id, state, transition)
                await self._after_report(coordinator, state)
            except Exception as exc:
                log.warning("coordinator_report_failed", state=state, error=f"{type(exc).__name__}: {exc}")

    async def _report_target(self) -> CoordinatorClient | None:
        return self.coordinator

    async def _after_report(self, coordinator: CoordinatorClient, state: str) -> None:
        pass

    async def _flush_reports(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not self._reports.empty() and loop.time() < end:
            await asyncio.sleep(0.05)
