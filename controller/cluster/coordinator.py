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
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from controller.cluster.ray_adapter import RayAdapter
from controller.cluster.records import Desired, Info, Member, MemberState, ReplicaStatus, Snapshot

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


def member_problem(members: dict[str, Member], new: Member) -> str | None:
    """Why the coordinator must refuse `new`: an address another live node reports,
    or Ray/Python versions that differ from the head's."""
    for node_id, m in members.items():
        if node_id == new.node_id or not m.alive or m.state in (MemberState.LOST, MemberState.STOPPED):
            continue
        if new.address and m.address == new.address:
            return (f"node {new.node_id} reports address {new.address}, which node {node_id} "
                    "already has: every node needs its own IP (set --node-ip-address)")
    head = next((m for m in members.values() if m.role == "head"), None)
    if head is not None and new.role != "head":
        for key, what in (("ray_version", "Ray"), ("python_version", "Python")):
            mine, theirs = getattr(new, key), getattr(head, key)
            if mine and theirs and mine != theirs:
                return (f"node {new.node_id} runs {what} {mine} but the head runs {theirs}: "
                        f"every node needs the same {what} version")
    return None


class CoordinatorState:
    """The coordinator's data and rules, without Ray."""

    def __init__(self, epoch: int, cluster: dict[str, Any] | None = None) -> None:
        self.epoch = epoch
        self.version = 0
        self.created_at = iso_now()
        self.desired = Desired.RUN
        # Facts of the cluster's configuration (mode, expected nodes). Its state is
        # not here: it is the head member's reported state.
        self.cluster: dict[str, Any] = dict(cluster or {})
        self.members: dict[str, Member] = {}
        self.replicas: list[ReplicaStatus] = []
        # The cluster's one transition history (every node's), bounded.
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY_SIZE)
        # Every transition ever reported, counted by "role|from|to|trigger" (for
        # /metrics; the history above keeps only the latest).
        self.transition_counts: dict[str, int] = {}
        # Draining workers the head has let go: their replica is stopped (or they
        # had none), so stopping their Ray loses no request.
        self.released: set[str] = set()
        # Join attempts after the first, over every registration (only grows: /metrics).
        self.join_retries = 0

    def _fence(self, epoch: int | None) -> None:
        if epoch != self.epoch:
            raise StaleEpoch(epoch, self.epoch)

    def _bump(self) -> None:
        self.version += 1

    def cluster_state(self) -> str | None:
        head = next((m for m in self.members.values() if m.role == "head"), None)
        return head.state.value if head is not None else None

    def info(self, member_lost: bool | None = None) -> Info:
        return Info(epoch=self.epoch, version=self.version, desired=self.desired,
                    cluster_state=self.cluster_state(), released=tuple(sorted(self.released)),
                    member_lost=member_lost)

    def register(self, member: Member, epoch: int | None) -> Info:
        self._fence(epoch)
        problem = member_problem(self.members, member)
        if problem:
            raise Refused(problem)
        now = iso_now()
        self.released.discard(member.node_id)  # a node that comes back is a member again
        self.join_retries += max(0, (member.join_attempt or 1) - 1)
        self.members[member.node_id] = replace(
            member, state=MemberState.JOINING, since=now, epoch=epoch, alive=True, last_seen=now,
            last_transition=None)
        self._bump()
        return self.info()

    def report(self, node_id: str, epoch: int | None, state: str,
               transition: dict[str, Any] | None = None) -> Info:
        self._fence(epoch)
        member = self.members.get(node_id)
        now = iso_now()
        if member is not None and member.alive:
            # A member marked LOST stays lost until it registers again: a late report
            # from a node Ray declared dead must not bring it back (two views).
            new = MemberState(state)
            if member.state is not new:
                member.since = now
            member.state, member.last_seen = new, now
            if transition is not None:
                member.last_transition = transition
        if transition is not None:
            self.history.append({"at": now, "node_id": node_id, **transition})
            role = member.role if member is not None else "unknown"
            key = "|".join((role, transition["from"], transition["to"], transition["trigger"]))
            self.transition_counts[key] = self.transition_counts.get(key, 0) + 1
        self._bump()
        return self.info()

    def heartbeat(self, node_id: str, epoch: int | None) -> Info:
        """The member's liveness; the answer tells a member the cluster counts as
        lost (its Ray node was declared dead) so that it rejoins."""
        self._fence(epoch)
        member = self.members.get(node_id)
        if member is not None and member.alive:
            member.last_seen = iso_now()
        lost = member is None or not member.alive
        return self.info(member_lost=lost)  # no version bump: heartbeats must not wake watchers

    def set_cluster(self, epoch: int | None, **fields: Any) -> Info:
        self._fence(epoch)
        if "state" in fields:
            raise ValueError("the cluster's state is the head's reported state; report it instead")
        if any(self.cluster.get(k) != v for k, v in fields.items()):
            self.cluster.update(fields)
            self._bump()
        return self.info()

    def mark_lost(self, epoch: int | None, node_ids: list[str]) -> Info:
        """Members whose Ray node died: they are LOST until they register again."""
        self._fence(epoch)
        changed = False
        for node_id in node_ids:
            member = self.members.get(node_id)
            if member is not None and member.alive:
                # A node that was draining left as asked; any other was lost.
                left = member.state in (MemberState.DRAINING, MemberState.STOPPED)
                member.state = MemberState.STOPPED if left else MemberState.LOST
                member.alive, member.since = False, iso_now()
                changed = True
        if changed:
            self._bump()
        return self.info()

    def release(self, epoch: int | None, node_ids: list[str]) -> Info:
        """The head lets draining workers go (their replicas are stopped)."""
        self._fence(epoch)
        new = set(node_ids) - self.released
        if new:
            self.released |= new
            self._bump()
        return self.info()

    def set_desired(self, epoch: int | None, desired: str) -> Info:
        self._fence(epoch)
        try:
            wanted = Desired(desired)
        except ValueError:
            raise ValueError(f"desired state must be 'run' or 'drain', got {desired!r}") from None
        if self.desired is not wanted:
            self.desired = wanted
            self._bump()
        return self.info()

    def set_replicas(self, epoch: int | None, replicas: list[ReplicaStatus]) -> Info:
        self._fence(epoch)
        if replicas != self.replicas:
            self.replicas = list(replicas)
            self._bump()
        return self.info()

    def snapshot(self) -> Snapshot:
        info = self.info()
        return Snapshot(
            epoch=info.epoch, version=info.version, desired=info.desired, cluster_state=info.cluster_state,
            released=info.released, created_at=self.created_at, cluster=dict(self.cluster),
            members=[replace(m) for m in self.members.values()],
            replicas=[replace(r) for r in self.replicas],
            transitions=list(self.history), transition_counts=dict(self.transition_counts),
            join_retries=self.join_retries,
        )


class Coordinator:
    """The Ray actor around CoordinatorState (the adapter makes it an actor)."""

    def __init__(self, epoch: int, cluster: dict[str, Any] | None = None) -> None:
        self._state = CoordinatorState(epoch, cluster)
        self._changed = asyncio.Condition()

    async def _write(self, method: str, *args: Any, **kwargs: Any) -> Info:
        before = self._state.version
        result = getattr(self._state, method)(*args, **kwargs)
        if self._state.version != before:
            async with self._changed:
                self._changed.notify_all()
        return result

    async def info(self) -> Info:
        return self._state.info()

    async def snapshot(self) -> Snapshot:
        return self._state.snapshot()

    async def register(self, member: Member, epoch: int | None) -> Info:
        return await self._write("register", member, epoch)

    async def report(self, node_id: str, epoch: int | None, state: str,
                     transition: dict[str, Any] | None = None) -> Info:
        return await self._write("report", node_id, epoch, state, transition)

    async def heartbeat(self, node_id: str, epoch: int | None) -> Info:
        return self._state.heartbeat(node_id, epoch)

    async def set_cluster(self, epoch: int | None, fields: dict[str, Any]) -> Info:
        return await self._write("set_cluster", epoch, **fields)

    async def mark_lost(self, epoch: int | None, node_ids: list[str]) -> Info:
        return await self._write("mark_lost", epoch, node_ids)

    async def release(self, epoch: int | None, node_ids: list[str]) -> Info:
        return await self._write("release", epoch, node_ids)

    async def set_desired(self, epoch: int | None, desired: str) -> Info:
        return await self._write("set_desired", epoch, desired)

    async def set_replicas(self, epoch: int | None, replicas: list[ReplicaStatus]) -> Info:
        return await self._write("set_replicas", epoch, replicas)

    async def wait_for_change(self, since_version: int, timeout: float) -> Info:
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
    """A controller's handle on the coordinator: bounded calls through the Ray
    adapter, the caller's epoch carried on every write."""

    def __init__(self, ray: RayAdapter, handle: Any, epoch: int, call_timeout: float = 5.0) -> None:
        self.ray = ray
        self.handle = handle
        self.epoch = epoch
        self.call_timeout = call_timeout

    @classmethod
    async def create_or_attach(cls, ray: RayAdapter, epoch: int, head_ray_node_id: str,
                               timeout: float = 30.0) -> "CoordinatorClient":
        """Create the actor on the head node, or attach to the live one.

        An existing actor keeps its epoch: `epoch` only seeds a new one.
        """
        # Every worker holds a long-poll while it heartbeats: at 1,000 concurrent calls
        # (the old limit) 1,000 members' long-polls held every slot and heartbeats
        # waited ~60 s (bench/coordinator.py). Calls here are coroutines; slots are cheap.
        handle = ray.create_actor(Coordinator, epoch, name=ACTOR_NAME, node_id=head_ray_node_id,
                                  max_concurrency=COORDINATOR_CONCURRENCY)
        info = await ray.call(handle, "info", timeout=timeout)
        return cls(ray, handle, info.epoch)

    @classmethod
    async def attach(cls, ray: RayAdapter, timeout: float = 10.0) -> "CoordinatorClient":
        """Find the running coordinator (workers). Raises LookupError when there is none."""
        handle = await ray.get_actor(ACTOR_NAME, timeout)
        info = await ray.call(handle, "info", timeout=timeout)
        return cls(ray, handle, info.epoch)

    async def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        return await self.ray.call(self.handle, method, *args, timeout=timeout or self.call_timeout)

    async def info(self) -> Info:
        return await self._call("info")

    async def snapshot(self) -> Snapshot:
        return await self._call("snapshot")

    async def register(self, member: Member) -> Info:
        return await self._call("register", member, self.epoch)

    async def report(self, node_id: str, state: str, transition: dict[str, Any] | None) -> Info:
        return await self._call("report", node_id, self.epoch, state, transition)

    async def heartbeat(self, node_id: str) -> Info:
        return await self._call("heartbeat", node_id, self.epoch)

    async def set_cluster(self, **fields: Any) -> Info:
        return await self._call("set_cluster", self.epoch, fields)

    async def mark_lost(self, node_ids: list[str]) -> Info:
        return await self._call("mark_lost", self.epoch, node_ids)

    async def release(self, node_ids: list[str]) -> Info:
        return await self._call("release", self.epoch, node_ids)

    async def set_desired(self, desired: str) -> Info:
        return await self._call("set_desired", self.epoch, desired)

    async def set_replicas(self, replicas: list[ReplicaStatus]) -> Info:
        return await self._call("set_replicas", self.epoch, replicas)

    async def wait_for_change(self, since_version: int, timeout: float) -> Info:
        return await self._call("wait_for_change", since_version, timeout, timeout=timeout + self.call_timeout)

    async def kill(self) -> None:
        """End the detached actor (it would outlive the drivers otherwise)."""
        await self.ray.kill_actor(self.handle)
