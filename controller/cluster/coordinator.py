"""The coordinator: one named, detached Ray async actor pinned to the head node.

It is the cluster's shared memory: epoch, membership, desired state, replica
endpoints and a bounded transition history. Every write carries the caller's
epoch; a stale epoch is refused (fencing). Watchers long-poll
`wait_for_change(since_version, timeout)` instead of busy-looping.

`CoordinatorState` is plain Python (unit-testable without Ray); `Coordinator`
is the thin actor around it; `CoordinatorClient` is what controllers call.
"""

from __future__ import annotations

import asyncio
from collections import deque
from datetime import datetime, timezone
from typing import Any

from controller.preflight import member_problem

ACTOR_NAME = "llm-controller-coordinator"
HISTORY_SIZE = 200
COORDINATOR_CONCURRENCY = 10_000


class StaleEpoch(RuntimeError):
    """The call carried an epoch that is not the cluster's current one."""

    def __init__(self, given: int | None, current: int) -> None:
        super().__init__(f"stale epoch {given}: the cluster is at epoch {current}")
        self.given = given
        self.current = current

    def __reduce__(self):  # survives Ray's pickling of the error
        return (StaleEpoch, (self.given, self.current))


class Refused(RuntimeError):
    """The coordinator refused a member; joining again will not help."""

    def __reduce__(self):  # survives Ray's pickling of the error
        return (Refused, self.args)


def iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class CoordinatorState:
    """The coordinator's data and rules, without Ray."""

    def __init__(self, epoch: int, cluster: dict[str, Any] | None = None) -> None:
        self.epoch = epoch
        self.version = 0
        self.created_at = iso_now()
        self.desired = "run"
        self.cluster: dict[str, Any] = {"state": "INIT", **(cluster or {})}
        self.members: dict[str, dict[str, Any]] = {}
        self.replicas: list[dict[str, Any]] = []
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_SIZE)
        # Every transition ever reported, counted by "role|from|to|trigger" (for
        # /metrics; the history above keeps only the latest).
        self.transition_counts: dict[str, int] = {}
        # Draining workers the head has let go: their replica is stopped (or they
        # had none), so stopping their Ray loses no request.
        self.released: set[str] = set()

    def _fence(self, epoch: int | None) -> None:
        if epoch != self.epoch:
            raise StaleEpoch(epoch, self.epoch)

    def _bump(self) -> None:
        self.version += 1

    def info(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "version": self.version, "desired": self.desired,
                "cluster_state": self.cluster.get("state"), "released": sorted(self.released)}

    def register(self, member: dict[str, Any], epoch: int | None) -> dict[str, Any]:
        self._fence(epoch)
        problem = member_problem(self.members, member)
        if problem:
            raise Refused(problem)
        now = iso_now()
        self.released.discard(member["node_id"])  # a node that comes back is a member again
        self.members[member["node_id"]] = {
            "state": "JOINING", "since": now, **member,
            "epoch": epoch, "alive": True, "last_seen": now, "last_transition": None,
        }
        self._bump()
        return self.info()

    def report(self, node_id: str, epoch: int | None, state: str,
               transition: dict[str, Any] | None = None) -> dict[str, Any]:
        self._fence(epoch)
        member = self.members.get(node_id)
        now = iso_now()
        if member is not None and member["alive"]:
            # A member marked LOST stays lost until it registers again: a late report
            # from a node Ray declared dead must not bring it back (two views).
            if member["state"] != state:
                member["since"] = now
            member.update(state=state, last_seen=now)
            if transition is not None:
                member["last_transition"] = transition
        if transition is not None:
            self.history.append({"at": now, "node_id": node_id, **transition})
            role = member["role"] if member is not None else "unknown"
            key = "|".join((role, transition["from"], transition["to"], transition["trigger"]))
            self.transition_counts[key] = self.transition_counts.get(key, 0) + 1
        self._bump()
        return self.info()

    def heartbeat(self, node_id: str, epoch: int | None) -> dict[str, Any]:
        """The member's liveness; the answer tells a member the cluster counts as
        lost (its Ray node was declared dead) so that it rejoins."""
        self._fence(epoch)
        member = self.members.get(node_id)
        if member is not None and member["alive"]:
            member["last_seen"] = iso_now()
        lost = member is None or not member["alive"]
        return {**self.info(), "member_lost": lost}  # no version bump: heartbeats must not wake watchers

    def set_cluster(self, epoch: int | None, **fields: Any) -> dict[str, Any]:
        self._fence(epoch)
        if any(self.cluster.get(k) != v for k, v in fields.items()):
            self.cluster.update(fields)
            self._bump()
        return self.info()

    def mark_lost(self, epoch: int | None, node_ids: list[str]) -> dict[str, Any]:
        """Members whose Ray node died: they are LOST until they register again."""
        self._fence(epoch)
        changed = False
        for node_id in node_ids:
            member = self.members.get(node_id)
            if member is not None and member["alive"]:
                # A node that was draining left as asked; any other was lost.
                gone = "STOPPED" if member["state"] in ("DRAINING", "STOPPED") else "LOST"
                member.update(alive=False, state=gone, since=iso_now())
                changed = True
        if changed:
            self._bump()
        return self.info()

    def release(self, epoch: int | None, node_ids: list[str]) -> dict[str, Any]:
        """The head lets draining workers go (their replicas are stopped)."""
        self._fence(epoch)
        new = set(node_ids) - self.released
        if new:
            self.released |= new
            self._bump()
        return self.info()

    def set_desired(self, epoch: int | None, desired: str) -> dict[str, Any]:
        self._fence(epoch)
        if desired not in ("run", "drain"):
            raise ValueError(f"desired state must be 'run' or 'drain', got {desired!r}")
        if self.desired != desired:
            self.desired = desired
            self._bump()
        return self.info()

    def set_replicas(self, epoch: int | None, replicas: list[dict[str, Any]]) -> dict[str, Any]:
        self._fence(epoch)
        if replicas != self.replicas:
            self.replicas = list(replicas)
            self._bump()
        return self.info()

    def snapshot(self) -> dict[str, Any]:
        return {
            **self.info(),
            "created_at": self.created_at,
            "cluster": dict(self.cluster),
            "members": [dict(m) for m in self.members.values()],
            "replicas": [dict(r) for r in self.replicas],
            "transitions": list(self.history),
            "transition_counts": dict(self.transition_counts),
        }


class Coordinator:
    """The Ray actor around CoordinatorState (decorated with ray.remote on use)."""

    def __init__(self, epoch: int, cluster: dict[str, Any] | None = None) -> None:
        self._state = CoordinatorState(epoch, cluster)
        self._changed = asyncio.Condition()

    async def _write(self, method: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        before = self._state.version
        result = getattr(self._state, method)(*args, **kwargs)
        if self._state.version != before:
            async with self._changed:
                self._changed.notify_all()
        return result

    async def info(self) -> dict[str, Any]:
        return self._state.info()

    async def snapshot(self) -> dict[str, Any]:
        return self._state.snapshot()

    async def register(self, member: dict[str, Any], epoch: int | None) -> dict[str, Any]:
        return await self._write("register", member, epoch)

    async def report(self, node_id: str, epoch: int | None, state: str,
                     transition: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._write("report", node_id, epoch, state, transition)

    async def heartbeat(self, node_id: str, epoch: int | None) -> dict[str, Any]:
        return self._state.heartbeat(node_id, epoch)

    async def set_cluster(self, epoch: int | None, fields: dict[str, Any]) -> dict[str, Any]:
        return await self._write("set_cluster", epoch, **fields)

    async def mark_lost(self, epoch: int | None, node_ids: list[str]) -> dict[str, Any]:
        return await self._write("mark_lost", epoch, node_ids)

    async def release(self, epoch: int | None, node_ids: list[str]) -> dict[str, Any]:
        return await self._write("release", epoch, node_ids)

    async def set_desired(self, epoch: int | None, desired: str) -> dict[str, Any]:
        return await self._write("set_desired", epoch, desired)

    async def set_replicas(self, epoch: int | None, replicas: list[dict[str, Any]]) -> dict[str, Any]:
        return await self._write("set_replicas", epoch, replicas)

    async def wait_for_change(self, since_version: int, timeout: float) -> dict[str, Any]:
        """Return `info()` (epoch, version, desired, cluster state) once the version passes
        `since_version`, or at `timeout`. Not the whole snapshot: every member watches,
        and a snapshot per watcher per change grows with the square of the members
        (5.3 s to reach 1,000 watchers; bench/coordinator.py). `snapshot()` has the rest."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._state.version > since_version), timeout
                )
            except asyncio.TimeoutError:
                pass
        return self._state.info()


class CoordinatorClient:
    """A controller's handle on the coordinator: bounded calls, epoch carried."""

    def __init__(self, handle: Any, epoch: int, call_timeout: float = 5.0) -> None:
        self.handle = handle
        self.epoch = epoch
        self.call_timeout = call_timeout

    @classmethod
    async def create_or_attach(cls, epoch: int, head_ray_node_id: str,
                               timeout: float = 30.0) -> "CoordinatorClient":
        """Create the actor on the head node, or attach to the live one.

        An existing actor keeps its epoch: `epoch` only seeds a new one.
        """
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from controller.cluster.ray_adapter import NAMESPACE

        actor_cls = ray.remote(Coordinator)
        handle = actor_cls.options(
            name=ACTOR_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            # Every worker holds a long-poll while it heartbeats: at 1,000 concurrent calls
            # (the old limit) 1,000 members' long-polls held every slot and heartbeats
            # waited ~60 s (bench/coordinator.py). Calls here are coroutines; slots are cheap.
            max_concurrency=COORDINATOR_CONCURRENCY,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=head_ray_node_id, soft=False),
        ).remote(epoch)
        info = await asyncio.wait_for(handle.info.remote(), timeout)
        return cls(handle, info["epoch"])

    @classmethod
    async def attach(cls, timeout: float = 10.0) -> "CoordinatorClient":
        """Find the running coordinator (workers). Raises LookupError when there is none."""
        import ray

        from controller.cluster.ray_adapter import NAMESPACE

        def _get():
            return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)

        try:
            handle = await asyncio.wait_for(asyncio.to_thread(_get), timeout)
        except ValueError:
            raise LookupError("the coordinator actor does not exist (yet)") from None
        info = await asyncio.wait_for(handle.info.remote(), timeout)
        return cls(handle, info["epoch"])

    async def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        ref = getattr(self.handle, method).remote(*args)
        return await asyncio.wait_for(ref, timeout or self.call_timeout)

    async def info(self) -> dict[str, Any]:
        return await self._call("info")

    async def snapshot(self) -> dict[str, Any]:
        return await self._call("snapshot")

    async def register(self, member: dict[str, Any]) -> dict[str, Any]:
        return await self._call("register", member, self.epoch)

    async def report(self, node_id: str, state: str, transition: dict[str, Any] | None) -> dict[str, Any]:
        return await self._call("report", node_id, self.epoch, state, transition)

    async def heartbeat(self, node_id: str) -> dict[str, Any]:
        return await self._call("heartbeat", node_id, self.epoch)

    async def set_cluster(self, **fields: Any) -> dict[str, Any]:
        return await self._call("set_cluster", self.epoch, fields)

    async def mark_lost(self, node_ids: list[str]) -> dict[str, Any]:
        return await self._call("mark_lost", self.epoch, node_ids)

    async def release(self, node_ids: list[str]) -> dict[str, Any]:
        return await self._call("release", self.epoch, node_ids)

    async def set_desired(self, desired: str) -> dict[str, Any]:
        return await self._call("set_desired", self.epoch, desired)

    async def set_replicas(self, replicas: list[dict[str, Any]]) -> dict[str, Any]:
        return await self._call("set_replicas", self.epoch, replicas)

    async def wait_for_change(self, since_version: int, timeout: float) -> dict[str, Any]:
        return await self._call("wait_for_change", since_version, timeout, timeout=timeout + self.call_timeout)

    async def kill(self) -> None:
        """End the detached actor (it would outlive the drivers otherwise)."""
        import ray

        await asyncio.to_thread(ray.kill, self.handle, no_restart=True)
