"""What the head shows: the `/status` document (and so `/metrics` and the status
command), and `progress` events while the cluster waits for nodes and engines.

It owns no fact: it reads each one from its owner (the head's lifecycle state,
the coordinator's snapshot for members and transitions, the board for alive
nodes, the reconciler for engines and restarts, the gateway for load).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable, Protocol

from controller.cluster.coordinator import CoordinatorClient
from controller.cluster.ray_adapter import RayAdapter
from controller.cluster.records import Member, Snapshot
from controller.config import Config
from controller.lifecycle.loop import Board
from controller.logs import log
from controller.serving.gateway import Gateway
from states import State

SNAPSHOT_TIMEOUT_S = 3.0
REPORT_FLUSH_S = 1.0
PROGRESS_POLL_S, PROGRESS_EVERY_S = 1.0, 10.0
MEMBER_FIELDS = ("node_id", "role", "state", "address", "since", "pid", "alive", "ray_node_id", "ray_pgid",
                 "epoch", "last_seen", "join_attempt")


class Engines(Protocol):
    def progress(self) -> tuple[int, int]: ...

    def restarts_total(self) -> int: ...


class Head(Protocol):
    """What the view reads of the head node."""

    config: Config
    board: Board
    ray: RayAdapter
    state: State
    since: str
    address: str | None
    ray_node_id: str | None
    coordinator: CoordinatorClient | None
    gateway: Gateway | None
    engines: Engines | None

    def epoch(self) -> int | None: ...

    async def flush_reports(self, timeout: float) -> None: ...


class StatusView:
    def __init__(self, head: Head, clock: Callable[[], float]) -> None:
        self.head = head
        self.clock = clock
        # The last snapshot read: its counters and history stand in while the
        # coordinator does not answer (counters must not fall back to 0).
        self._last: Snapshot | None = None

    def progress(self) -> dict[str, Any]:
        """How far the cluster is from serving in full: nodes joined, engines ready."""
        h = self.head
        ready, engines = h.engines.progress() if h.engines is not None else (0, 0)
        return {"nodes_alive": h.board.get("alive_nodes") or 0, "nodes_expected": h.config.expected_nodes,
                "engines_ready": ready, "engines_expected": engines}

    async def report_progress(self) -> None:
        """A `progress` event while waiting for nodes and engines (bring-up, or a
        recovery): on each change and every PROGRESS_EVERY_S, one line on a terminal."""
        h = self.head
        waiting_in = h.state
        started, last, last_at = self.clock(), None, 0.0
        timeout = h.config.wait_timeout if waiting_in is State.WAITING_FOR_WORKERS else h.config.degraded_timeout
        while h.state is waiting_in:
            now, p = self.clock(), self.progress()
            if p != last or now - last_at >= PROGRESS_EVERY_S:
                elapsed = round(now - started, 1)
                line = (f"nodes {p['nodes_alive']}/{p['nodes_expected']} alive, engines "
                        f"{p['engines_ready']}/{p['engines_expected']} ready, {elapsed:.0f}s"
                        + (f" of {timeout:g}s" if timeout else ""))
                log.info("progress", state=waiting_in.value, line=line, elapsed_s=elapsed,
                         timeout_s=timeout or None, **p)
                last, last_at = p, now
            await asyncio.sleep(PROGRESS_POLL_S)

    def last_members(self) -> list[Member]:
        """The members of the last snapshot read (for a shutdown whose coordinator is silent)."""
        return self._last.members if self._last else []

    async def _snapshot(self) -> Snapshot | None:
        h = self.head
        if h.coordinator is None or not h.ray.connected:
            return None
        # The head's own transitions are reported to the coordinator a moment after
        # they happen: wait for them (bounded), so /status tells one story. Not while
        # the coordinator fails to answer: the snapshot below says so soon enough.
        if h.board.failing_since("coordinator") is None:
            await h.flush_reports(REPORT_FLUSH_S)
        try:
            self._last = await asyncio.wait_for(h.coordinator.snapshot(), SNAPSHOT_TIMEOUT_S)
            return self._last
        except Exception as exc:
            log.warning("status_snapshot_failed", error=f"{type(exc).__name__}: {exc}")
            return None

    def _replicas(self, snap: Snapshot | None) -> list[dict[str, Any]]:
        g = self.head.gateway
        load = g.replica_load() if g else {}
        empty = {"in_flight": 0, "requests": 0, "failed": 0, "continued_away": 0, "stalls": 0}
        return [{**r.as_dict(), **load.get(r.replica_id, empty)} for r in (snap.replicas if snap else [])]

    def _gateway(self) -> dict[str, Any] | None:
        g = self.head.gateway
        if g is None:
            return None
        return {"port": g.port, "in_flight": g.in_flight, "draining": g.draining,
                "unhealthy": {r.replica_id: r.unhealthy for r in g.pool.marked()}, "counts": dict(g.counts),
                "continuations": dict(g.continuations), "requests_failed": dict(g.failed), "stalls": g.stalls}

    async def status(self) -> dict[str, Any]:
        h, cfg = self.head, self.head.config
        snap = await self._snapshot()
        head_entry = {"node_id": cfg.node_id, "role": "head", "state": h.state.value,
                      "address": h.address, "since": h.since, "pid": os.getpid(),
                      "alive": True, "ray_node_id": h.ray_node_id,
                      "ray_pgid": h.ray.node.pgid if h.ray.node else None}
        nodes: list[dict[str, Any]] = [head_entry]
        for m in snap.members if snap else []:
            if m.node_id == cfg.node_id:
                head_entry["epoch"] = m.epoch
                continue
            member = m.as_dict()
            nodes.append({k: member.get(k) for k in MEMBER_FIELDS})
        gateway = self._gateway()
        last = snap or self._last
        return {
            "cluster": {
                "state": h.state.value,
                "epoch": h.epoch(),
                "mode": cfg.mode,
                "engine": cfg.engine,
                "expected_nodes": cfg.expected_nodes,
                "alive_nodes": h.board.get("alive_nodes"),
                "desired": snap.desired.value if snap else None,
                "coordinator_reachable": snap is not None,
            },
            "nodes": nodes,
            "replicas": self._replicas(snap),
            "gateway": gateway,
            "transitions": last.transitions if last else [],
            "transition_counts": last.transition_counts if last else {},
            "retries": {
                "worker_join": last.join_retries if last else 0,
                "engine_restart": h.engines.restarts_total() if h.engines is not None else 0,
                "gateway_request": (gateway or {}).get("counts", {}).get("retries", 0),
            },
        }
