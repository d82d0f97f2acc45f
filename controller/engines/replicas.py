"""The head's view of the engine replicas (replicated mode): one replica actor per
live node (at most `limit`), created where missing, dropped with their node,
polled for state and for their engine's output."""

from __future__ import annotations

import asyncio
from typing import Any

from controller.engines.engine import DEFAULT_ENGINE_ENV
from controller.logs import log

# Replica states in which the replica serves.
READY = "READY"
FAILED = "FAILED"


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


def choose_nodes(members: list[dict[str, Any]], have: set[str], limit: int) -> list[str]:
    """The node ids that should run a replica: those that have one stay, then the
    head, then the others by address, up to `limit` (0: every node)."""
    live = [m["node_id"] for m in members]
    keep = [n for n in live if n in have]
    order = sorted((m for m in members if m["node_id"] not in have),
                   key=lambda m: (m.get("role") != "head", m.get("address") or "", m["node_id"]))
    chosen = keep + [m["node_id"] for m in order]
    return chosen if limit <= 0 else chosen[:limit]


class ReplicaSet:
    def __init__(self, model: str, served_name: str, limit: int = 0, engine_port: int = 0,
                 supervision: dict[str, Any] | None = None, engine_env: dict[str, dict[str, str]] | None = None,
                 poll_timeout: float = 5.0) -> None:
        self.model = model
        self.served_name = served_name
        self.limit = limit
        self.engine_port = engine_port
        self.supervision = supervision or {}
        self.engine_env = engine_env or {}  # node address -> extra environment for its engine
        self.poll_timeout = poll_timeout
        self.handles: dict[str, Any] = {}
        self.ever_ready: set[str] = set()
        self.last: dict[str, dict[str, Any]] = {}
        self.output_seq: dict[str, int] = {}

    def wanted(self, expected_nodes: int) -> int:
        return expected_nodes if self.limit <= 0 else min(self.limit, expected_nodes)

    def ensure(self, members: list[dict[str, Any]], leaving: set[str] = frozenset()) -> None:
        """A replica actor on each chosen live member; forget those whose node is gone.

        The replicas of `leaving` nodes (draining workers) are kept until the head
        stops them (`stop_one`), and such nodes get none."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from controller.cluster.ray_adapter import NAMESPACE
        from controller.engines.replica import ReplicaActor

        live = {m["node_id"]: m for m in members}
        for node_id in list(self.handles):
            if node_id not in live and node_id not in leaving:
                log.warning("replica_dropped", node_id=node_id, reason="its node is gone")
                self.handles.pop(node_id)
                self.ever_ready.discard(node_id)
                self.last.pop(node_id, None)
                self.output_seq.pop(node_id, None)
        for node_id in choose_nodes(members, set(self.handles), self.limit):
            if node_id in self.handles:
                continue
            m = live[node_id]
            replica_id = f"replica-{node_id}"
            spec = {"model": self.model, "served_name": self.served_name, "host": m["address"],
                    "port": self.engine_port, "env": {**DEFAULT_ENGINE_ENV, **self.engine_env.get(m["address"], {})}}
            handle = ray.remote(ReplicaActor).options(
                name=replica_id, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                num_cpus=0, max_restarts=0, max_concurrency=100,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=m["ray_node_id"], soft=False),
            ).remote(replica_id, node_id, spec, **self.supervision)
            handle.start.remote()
            self.handles[node_id] = handle
            log.info("replica_created", replica_id=replica_id, node_id=node_id, address=m["address"])

    async def poll(self) -> list[dict[str, Any]]:
        """Every replica's state; their new engine output goes into this log."""
        async def one(node_id: str, handle: Any) -> dict[str, Any]:
            try:
                return await asyncio.wait_for(handle.status.remote(self.output_seq.get(node_id, 0)),
                                              self.poll_timeout)
            except Exception as exc:
                return {"replica_id": f"replica-{node_id}", "node_id": node_id, "url": None,
                        "state": "UNREACHABLE", "reason": f"{type(exc).__name__}: {exc}"[:300]}

        statuses = await asyncio.gather(*(one(n, h) for n, h in self.handles.items()))
        for s in statuses:
            for seq, line in s.pop("output", []):
                log.info("engine_output", replica_id=s["replica_id"], line=line)
                self.output_seq[s["node_id"]] = seq
            self.last[s["node_id"]] = s
            if s["state"] == READY:
                self.ever_ready.add(s["node_id"])
        return list(statuses)

    def all_ready(self, expected_nodes: int) -> bool:
        ready = [s for s in self.last.values() if s["state"] == READY]
        return len(self.handles) >= self.wanted(expected_nodes) and len(ready) == len(self.handles)

    def failure(self) -> str | None:
        """Why a replica that served no longer does, if one doesn't."""
        for node_id in sorted(self.ever_ready):
            s = self.last.get(node_id)
            if s is not None and s["state"] != READY:
                return f"{s['replica_id']} is {s['state']}: {s.get('reason') or 'no reason given'}"
        return None

    def given_up(self) -> str | None:
        """A replica whose supervisor gave up (no more restarts), if any."""
        for s in self.last.values():
            if s["state"] == FAILED:
                return f"{s['replica_id']} failed: {s.get('reason') or 'no reason given'}"
        return None

    async def stop_one(self, node_id: str, timeout: float) -> None:
        """Stop one node's replica (its engine first) and forget it."""
        import ray

        handle = self.handles.pop(node_id, None)
        for table in (self.last, self.output_seq):
            table.pop(node_id, None)
        self.ever_ready.discard(node_id)
        if handle is None:
            return
        try:
            await asyncio.wait_for(handle.stop.remote(), timeout)
        except Exception as exc:
            log.warning("replica_stop_failed", node_id=node_id, error=f"{type(exc).__name__}: {exc}")
        try:
            ray.kill(handle, no_restart=True)
        except Exception:
            pass
        log.info("replica_stopped", node_id=node_id)

    async def stop_all(self, timeout: float) -> None:
        import ray

        handles = list(self.handles.values())
        if handles:
            done = await asyncio.wait([asyncio.ensure_future(h.stop.remote()) for h in handles], timeout=timeout)
            log.info("replicas_stopped", stopped=len(done[0]), of=len(handles))
        for h in handles:
            try:
                ray.kill(h, no_restart=True)
            except Exception:
                pass
        self.handles.clear()
