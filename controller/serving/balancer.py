"""Which replica gets the next request: least outstanding requests among the
replicas that can take one, ties broken at random.

A replica can take a request when its supervisor reports it READY, the gateway
has not marked it unhealthy, and it is below its in-flight limit. The gateway
marks a replica unhealthy at once when it refuses or resets a connection; the
mark holds until the supervisor reports the replica READY again and the
replica answers `/health` (`clear`), so one refused connection costs one retry,
not a stream of failed requests. Plain Python: no I/O here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from controller.cluster.records import ReplicaStatus
from controller.serving.stalls import Progress


@dataclass
class Replica:
    replica_id: str
    url: str
    ready: bool = False       # the supervisor's word
    unhealthy: str | None = None  # the gateway's own signal: why, while marked
    last_ok: float | None = None  # when (the gateway's clock) it last answered well (request or /health)
    retiring: bool = False    # its node drains: no new requests, the ones in flight finish
    pid: int | None = None    # its engine's process: another pid is another engine
    stalled: bool = False     # marked because it made no progress (cleared by a real answer, not /health)
    in_flight: int = 0
    served: int = 0
    failed: int = 0
    continued_away: int = 0   # requests continued elsewhere from here
    stalls: int = 0
    flights: set[Any] = field(default_factory=set)  # the gateway's requests on it now
    writing: int = 0          # of them, those waiting for their client to take a write
    progress: Progress = field(default_factory=Progress)


@dataclass
class Pool:
    max_in_flight: int = 64
    rng: random.Random = field(default_factory=random.Random)
    replicas: dict[str, Replica] = field(default_factory=dict)

    def update(self, statuses: list[ReplicaStatus]) -> None:
        """The supervisors' view: replicas appear, change URL (a restarted engine may
        get a new port), change state, or go."""
        seen = set()
        for s in statuses:
            if not s.url:
                continue
            seen.add(s.replica_id)
            r = self.replicas.get(s.replica_id)
            if r is None or r.url != s.url or (s.pid is not None and r.pid is not None and r.pid != s.pid):
                # A new engine: requests still on the old one release the old entry.
                r = self.replicas[s.replica_id] = Replica(s.replica_id, s.url)
            r.ready = s.ready
            r.pid = s.pid if s.pid is not None else r.pid
        for rid in set(self.replicas) - seen:
            del self.replicas[rid]

    def available(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.ready and r.unhealthy is None and not r.retiring]

    def pick(self, exclude: set[str] = frozenset()) -> Replica | None:
        """The least loaded available replica under its limit, or None."""
        candidates = [r for r in self.available() if r.replica_id not in exclude and r.in_flight < self.max_in_flight]
        if not candidates:
            return None
        least = min(r.in_flight for r in candidates)
        return self.rng.choice([r for r in candidates if r.in_flight == least])

    def has_capacity_somewhere(self, exclude: set[str] = frozenset()) -> bool:
        """True when some available replica exists (full or not): worth queueing for."""
        return any(r.replica_id not in exclude for r in self.available())

    def mark_unhealthy(self, replica_id: str, reason: str, stalled: bool = False) -> bool:
        """Returns True when this is a new mark (the first signal of this failure)."""
        r = self.replicas.get(replica_id)
        if r is None or r.unhealthy is not None:
            return False
        r.unhealthy, r.stalled = reason, stalled
        return True

    def clear(self, replica_id: str) -> None:
        r = self.replicas.get(replica_id)
        if r is not None:
            r.unhealthy, r.stalled = None, False

    def retire(self, replica_id: str) -> int | None:
        """No new requests for this replica; returns its requests still in flight
        (None when the pool does not have it)."""
        r = self.replicas.get(replica_id)
        if r is None:
            return None
        r.retiring = True
        return r.in_flight

    def marked(self) -> list[Replica]:
        return [r for r in self.replicas.values() if r.unhealthy is not None]
