"""The head's view of the engine replicas (replicated mode): one replica actor per
live node (at most `limit`), created where missing, dropped with their node,
polled for state and for their engine's output."""

from __future__ import annotations

import asyncio
from typing import Any

from controller.cluster.ray_adapter import RayAdapter
from controller.cluster.records import Member, ReplicaState, ReplicaStatus
from controller.engines.engine import DEFAULT_ENGINE_ENV
from controller.engines.replica import ReplicaActor
from controller.logs import log


def one_machine_cpu_binding(addresses: list[str], cpus: list[int]) -> dict[str, dict[str, str]]:
    """Engines of a one-machine cluster, each on its own core where there are enough.

    vLLM's CPU build binds its compute threads by itself, to the same core in every
    engine of a machine: engines of several local nodes would then queue on one
    core while the others idle (seen here: 250 ms stalls with two engines on two
    cores). Node i gets core i (modulo the cores there are).
    """
    if len(addresses) < 2 or not cpus:
        return {}
    return {a: {"VLLM_CPU_OMP_THREADS_BIND": str(cpus[i % len(cpus)])} for i, a in enumerate(addresses)}


def choose_nodes(members: list[Member], have: set[str], limit: int) -> list[str]:
    """The node ids that should run a replica: those that have one stay, then the
    head, then the others by address, up to `limit` (0: every node)."""
    keep = [m.node_id for m in members if m.node_id in have]
    order = sorted((m for m in members if m.node_id not in have),
                   key=lambda m: (m.role != "head", m.address or "", m.node_id))
    chosen = keep + [m.node_id for m in order]
    return chosen if limit <= 0 else chosen[:limit]


class ReplicaSet:
    """The replica actors (one per chosen node) and the last status of each."""

    def __init__(self, ray: RayAdapter, model: str, served_name: str, limit: int = 0, engine_port: int = 0,
                 supervision: dict[str, Any] | None = None, engine_env: dict[str, dict[str, str]] | None = None,
                 poll_timeout: float = 5.0, actor_class: type = ReplicaActor) -> None:
        self.ray = ray
        self.model = model
        self.served_name = served_name
        self.limit = limit
        self.engine_port = engine_port
        self.supervision = supervision or {}
        self.engine_env = engine_env or {}  # node address -> extra environment for its engine
        self.poll_timeout = poll_timeout
        self.actor_class = actor_class
        self.handles: dict[str, Any] = {}
        self.ever_ready: set[str] = set()
        self.last: dict[str, ReplicaStatus] = {}
        self.output_seq: dict[str, int] = {}
        # Engine restarts of replicas this set dropped or stopped: the cluster's
        # restart count only grows (/metrics), whatever became of those replicas.
        self.restarts_of_gone = 0

    def wanted(self, expected_nodes: int) -> int:
        return expected_nodes if self.limit <= 0 else min(self.limit, expected_nodes)

    def restarts_total(self) -> int:
        return self.restarts_of_gone + sum(s.restarts for s in self.last.values())

    def _forget(self, node_id: str) -> Any:
        handle = self.handles.pop(node_id, None)
        gone = self.last.pop(node_id, None)
        if gone is not None:
            self.restarts_of_gone += gone.restarts
        self.output_seq.pop(node_id, None)
        self.ever_ready.discard(node_id)
        return handle

    def ensure(self, members: list[Member], leaving: set[str] = frozenset()) -> None:
        """A replica actor on each chosen live member; forget those whose node is gone.

        The replicas of `leaving` nodes (draining workers) are kept until the head
        stops them (`stop_one`), and such nodes get none."""
        live = {m.node_id: m for m in members}
        for node_id in list(self.handles):
            if node_id not in live and node_id not in leaving:
                log.warning("replica_dropped", node_id=node_id, reason="its node is gone")
                self._forget(node_id)
        for node_id in choose_nodes(members, set(self.handles), self.limit):
            if node_id in self.handles:
                continue
            m = live[node_id]
            replica_id = replica_id_of(node_id)
            spec = {"model": self.model, "served_name": self.served_name, "host": m.address,
                    "port": self.engine_port, "env": {**DEFAULT_ENGINE_ENV, **self.engine_env.get(m.address, {})}}
            handle = self.ray.create_actor(self.actor_class, replica_id, node_id, spec, name=replica_id,
                                           node_id=m.ray_node_id, max_concurrency=100, **self.supervision)
            self.ray.fire(handle, "start")
            self.handles[node_id] = handle
            log.info("replica_created", replica_id=replica_id, node_id=node_id, address=m.address)

    async def poll(self) -> list[ReplicaStatus]:
        """Every replica's state; their new engine output goes into this log."""
        async def one(node_id: str, handle: Any) -> ReplicaStatus:
            try:
                return await self.ray.call(handle, "status", self.output_seq.get(node_id, 0),
                                           timeout=self.poll_timeout)
            except Exception as exc:
                return ReplicaStatus(replica_id=replica_id_of(node_id), node_id=node_id, url=None,
                                     state=ReplicaState.UNREACHABLE, reason=f"{type(exc).__name__}: {exc}"[:300])

        polled = dict(self.handles)
        statuses = await asyncio.gather(*(one(n, h) for n, h in polled.items()))
        # A replica stopped or dropped while the poll was under way is not brought back.
        statuses = [s for s in statuses if self.handles.get(s.node_id) is polled[s.node_id]]
        for s in statuses:
            for seq, line in s.output:
                log.info("engine_output", replica_id=s.replica_id, line=line)
                self.output_seq[s.node_id] = seq
            s.output = []
            if s.state is ReplicaState.UNREACHABLE and s.node_id in self.last:
                s.restarts = self.last[s.node_id].restarts  # not known now, not lost either
            self.last[s.node_id] = s
            if s.ready:
                self.ever_ready.add(s.node_id)
        return list(statuses)

    def statuses(self) -> list[ReplicaStatus]:
        """The last answer of each replica (none yet for one just created)."""
        return [self.last[n] for n in self.handles if n in self.last]

    def ready_count(self) -> int:
        return sum(1 for s in self.last.values() if s.ready)

    def all_ready(self, expected_nodes: int) -> bool:
        return len(self.handles) >= self.wanted(expected_nodes) and self.ready_count() == len(self.handles)

    def failing(self) -> list[ReplicaStatus]:
        """Replicas that served and no longer do."""
        return [s for node_id in sorted(self.ever_ready)
                if (s := self.last.get(node_id)) is not None and not s.ready]

    def failure(self) -> str | None:
        """Why a replica that served no longer does, if one doesn't."""
        for s in self.failing():
            return f"{s.replica_id} is {s.state.value}: {s.reason or 'no reason given'}"
        return None

    def given_up(self) -> str | None:
        """A replica whose supervisor gave up (no more restarts), if any."""
        for s in self.last.values():
            if s.state is ReplicaState.FAILED:
                return f"{s.replica_id} failed: {s.reason or 'no reason given'}"
        return None

    async def stop_one(self, node_id: str, timeout: float) -> None:
        """Stop one node's replica (its engine first) and forget it."""
        handle = self._forget(node_id)
        if handle is None:
            return
        try:
            await self.ray.call(handle, "stop", timeout=timeout)
        except Exception as exc:
            log.warning("replica_stop_failed", node_id=node_id, error=f"{type(exc).__name__}: {exc}")
        await self.ray.kill_actor(handle)
        log.info("replica_stopped", node_id=node_id)

    async def stop_all(self, timeout: float) -> None:
        handles = {node_id: self._forget(node_id) for node_id in list(self.handles)}
        if handles:
            results = await asyncio.gather(*(self.ray.call(h, "stop", timeout=timeout) for h in handles.values()),
                                           return_exceptions=True)
            log.info("replicas_stopped", stopped=sum(not isinstance(r, BaseException) for r in results),
                     of=len(handles))
        for h in handles.values():
            await self.ray.kill_actor(h)


def replica_id_of(node_id: str) -> str:
    return f"replica-{node_id}"
