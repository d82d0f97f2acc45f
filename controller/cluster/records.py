"""Records that cross modules (and Ray calls): a cluster member, a replica's
status, the coordinator's snapshot and its short `info`. Plain dataclasses:
they pickle through Ray as they are, and `as_dict()` is their JSON form for
`/status`."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

from states import State


# A member's state as the coordinator holds it: the lifecycle states, and LOST
# for a member whose Ray node died (until it registers again).
MemberState = enum.Enum("MemberState", {**{s.name: s.value for s in State}, "LOST": "LOST"}, type=str,
                        module=__name__)


# Members that no longer count as serving capacity.
GONE_STATES = frozenset({MemberState.DRAINING, MemberState.STOPPED, MemberState.LOST})


class ReplicaState(str, enum.Enum):
    STARTING = "STARTING"
    READY = "READY"
    RESTARTING = "RESTARTING"
    FAILED = "FAILED"          # its supervisor gave up
    STOPPED = "STOPPED"
    UNREACHABLE = "UNREACHABLE"  # its actor did not answer the head's poll


class Desired(str, enum.Enum):
    RUN = "run"
    DRAIN = "drain"


@dataclass
class Member:
    """One node of the cluster, as it registered and as the coordinator tracks it."""

    node_id: str
    role: str
    address: str | None = None
    ray_node_id: str | None = None
    pid: int | None = None
    ray_pgid: int | None = None
    ray_version: str | None = None
    python_version: str | None = None
    join_attempt: int | None = None
    # Kept by the coordinator:
    state: MemberState = MemberState.JOINING
    since: str | None = None
    epoch: int | None = None
    alive: bool = True
    last_seen: str | None = None
    last_transition: dict[str, Any] | None = None

    @property
    def serving_capacity(self) -> bool:
        """Alive, not on its way out, and placed on a Ray node with an address."""
        return (self.alive and self.state not in GONE_STATES
                and bool(self.ray_node_id) and bool(self.address))

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        return out


@dataclass
class ReplicaStatus:
    """One engine replica as its supervisor reports it."""

    replica_id: str
    node_id: str | None
    url: str | None
    state: ReplicaState
    reason: str | None = None
    restarts: int = 0
    pid: int | None = None
    ready_s: float | None = None
    # New engine output lines (sequence number, line): consumed by the head's log.
    output: list[tuple[int, str]] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.state is ReplicaState.READY

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("output")
        out["state"] = self.state.value
        return out


@dataclass(frozen=True)
class Info:
    """The short answer of every coordinator write and of `wait_for_change`."""

    epoch: int
    version: int
    desired: Desired
    cluster_state: str | None
    released: tuple[str, ...] = ()
    member_lost: bool | None = None  # heartbeats only: the caller counts as lost


@dataclass
class Snapshot:
    """Everything the coordinator holds, at one version."""

    epoch: int
    version: int
    desired: Desired
    cluster_state: str | None
    released: tuple[str, ...]
    created_at: str
    cluster: dict[str, Any]
    members: list[Member]
    replicas: list[ReplicaStatus]
    transitions: list[dict[str, Any]]
    transition_counts: dict[str, int]
    join_retries: int = 0

    def member(self, node_id: str) -> Member | None:
        return next((m for m in self.members if m.node_id == node_id), None)

    def head(self) -> Member | None:
        return next((m for m in self.members if m.role == "head"), None)

    def leaving(self) -> set[str]:
        """Workers that drain on their own and that the head has not released yet."""
        return {m.node_id for m in self.members
                if m.alive and m.state is MemberState.DRAINING and m.node_id not in self.released}
