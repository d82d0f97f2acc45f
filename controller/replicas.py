"""The head's view of the engine replicas (replicated mode): one replica actor per
live node, created where missing, dropped with their node, polled for state."""

from __future__ import annotations

import asyncio
from typing import Any

from controller.logs import log

# Replica states in which the replica serves.
READY = "READY"


class ReplicaSet:
    def __init__(self, model: str, served_name: str, poll_timeout: float = 5.0) -> None:
        self.model = model
        self.served_name = served_name
        self.poll_timeout = poll_timeout
        self.handles: dict[str, Any] = {}
        self.ever_ready: set[str] = set()
        self.last: dict[str, dict[str, Any]] = {}

    def ensure(self, members: list[dict[str, Any]]) -> None:
        """One replica actor per live member; forget those whose node is gone."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from controller.ray_adapter import NAMESPACE
        from controller.replica import ReplicaActor

        live = {m["node_id"]: m for m in members}
        for node_id in list(self.handles):
            if node_id not in live:
                log.warning("replica_dropped", node_id=node_id, reason="its node is gone")
                self.handles.pop(node_id)
                self.ever_ready.discard(node_id)
                self.last.pop(node_id, None)
        for node_id, m in live.items():
            if node_id in self.handles:
                continue
            replica_id = f"replica-{node_id}"
            spec = {"model": self.model, "served_name": self.served_name, "host": m["address"], "port": 0}
            handle = ray.remote(ReplicaActor).options(
                name=replica_id, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
                num_cpus=0, max_restarts=0, max_concurrency=100,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=m["ray_node_id"], soft=False),
            ).remote(replica_id, node_id, spec)
            handle.start.remote()
            self.handles[node_id] = handle
            log.info("replica_created", replica_id=replica_id, node_id=node_id, address=m["address"])

    async def poll(self) -> list[dict[str, Any]]:
        async def one(node_id: str, handle: Any) -> dict[str, Any]:
            try:
                return await asyncio.wait_for(handle.status.remote(), self.poll_timeout)
            except Exception as exc:
                return {"replica_id": f"replica-{node_id}", "node_id": node_id, "url": None,
                        "state": "UNREACHABLE", "reason": f"{type(exc).__name__}: {exc}"[:300]}

        statuses = await asyncio.gather(*(one(n, h) for n, h in self.handles.items()))
        for s in statuses:
            self.last[s["node_id"]] = s
            if s["state"] == READY:
                self.ever_ready.add(s["node_id"])
        return list(statuses)

    def all_ready(self, expected: int) -> bool:
        ready = [s for s in self.last.values() if s["state"] == READY]
        return len(self.handles) >= expected and len(ready) == len(self.handles)

    def failure(self) -> str | None:
        """Why a replica that served no longer does, if one doesn't."""
        for node_id in sorted(self.ever_ready):
            s = self.last.get(node_id)
            if s is not None and s["state"] != READY:
                return f"{s['replica_id']} is {s['state']}: {s.get('reason') or 'no reason given'}"
        return None

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
