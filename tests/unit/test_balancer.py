"""The balancer's rules, without I/O: least outstanding requests, random ties,
limits, and unhealthy marks."""

import random
from collections import Counter

from controller.cluster.records import ReplicaState, ReplicaStatus
from controller.serving.balancer import Pool


def pool(*states: str, limit: int = 4) -> Pool:
    p = Pool(max_in_flight=limit, rng=random.Random(7))
    p.update([ReplicaStatus(f"r{i}", None, f"http://10.0.0.{i}:8000", ReplicaState(s)) for i, s in enumerate(states)])
    return p


def test_least_outstanding_wins_and_ties_are_random():
    p = pool("READY", "READY", "READY")
    p.replicas["r0"].in_flight = 2
    p.replicas["r1"].in_flight = 1
    p.replicas["r2"].in_flight = 1
    picks = Counter(p.pick().replica_id for _ in range(400))
    assert set(picks) == {"r1", "r2"} and 150 < picks["r1"] < 250


def test_only_ready_unmarked_replicas_under_their_limit():
    p = pool("READY", "STARTING", "READY", limit=2)
    p.mark_unhealthy("r2", "ConnectionRefused")
    assert p.pick().replica_id == "r0"
    p.replicas["r0"].in_flight = 2
    assert p.pick() is None and p.has_capacity_somewhere()  # full, not gone: worth queueing
    assert p.pick(exclude={"r0"}) is None and not p.has_capacity_somewhere(exclude={"r0"})


def test_a_mark_is_reported_once_and_held_until_cleared():
    p = pool("READY", "READY")
    assert p.mark_unhealthy("r1", "reset") is True
    assert p.mark_unhealthy("r1", "reset again") is False
    assert [r.replica_id for r in p.marked()] == ["r1"]
    p.update([ReplicaStatus("r0", None, "http://10.0.0.0:8000", ReplicaState("READY")),
              ReplicaStatus("r1", None, "http://10.0.0.1:8000", ReplicaState("READY"))])
    assert p.replicas["r1"].unhealthy == "reset"  # the supervisor's READY alone does not clear it
    p.clear("r1")
    assert {r.replica_id for r in p.available()} == {"r0", "r1"}


def test_a_restarted_engine_on_a_new_port_is_a_new_replica_and_gone_ones_leave():
    p = pool("READY", "READY")
    p.mark_unhealthy("r1", "refused")
    p.replicas["r1"].in_flight = 1
    p.update([ReplicaStatus("r1", None, "http://10.0.0.1:9000", ReplicaState("READY"))])
    assert set(p.replicas) == {"r1"}
    r1 = p.replicas["r1"]
    assert r1.unhealthy is None and r1.url.endswith(":9000") and r1.in_flight == 0


def test_a_retiring_replica_takes_no_new_request_and_says_what_is_in_flight():
    p = pool("READY", "READY")
    p.replicas["r0"].in_flight = 2
    assert p.retire("r0") == 2 and p.retire("nope") is None
    assert [p.pick().replica_id for _ in range(20)] == ["r1"] * 20
    p.update([ReplicaStatus("r0", None, "http://10.0.0.0:8000", ReplicaState("READY")),
              ReplicaStatus("r1", None, "http://10.0.0.1:8000", ReplicaState("READY"))])
    assert p.replicas["r0"].retiring  # the supervisors' next report does not bring it back
