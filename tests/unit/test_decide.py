"""decide(): what each observation leads to, per role and state."""

import pytest

from states import Decision, Limits, Observation, Role, State, Trigger, decide

S, T = State, Trigger
LIMITS = Limits(expected_nodes=3, wait_timeout=60, degraded_timeout=0, failure_threshold=3)


def obs(**kw) -> Observation:
    kw.setdefault("now", 100.0)
    kw.setdefault("entered_at", 100.0)
    return Observation(**kw)


def trig(role, state, o, limits=LIMITS):
    d = decide(role, state, o, limits)
    return None if d is None else d.trigger


HEAD_CASES = [
    (S.INIT, obs(), T.START),
    (S.JOINING, obs(), None),
    (S.JOINING, obs(head_up=True), T.HEAD_UP),
    (S.WAITING_FOR_WORKERS, obs(alive_nodes=2, registered_workers=1), None),
    (S.WAITING_FOR_WORKERS, obs(alive_nodes=3, registered_workers=1), None),  # ray node up, not registered
    (S.WAITING_FOR_WORKERS, obs(alive_nodes=3, registered_workers=2), T.CLUSTER_READY),
    (S.WAITING_FOR_WORKERS, obs(alive_nodes=3, registered_workers=2, engines_ready=False), None),
    (S.WAITING_FOR_WORKERS, obs(alive_nodes=2, registered_workers=1, now=160.0), T.FATAL),
    (S.SERVING, obs(alive_nodes=3, registered_workers=2), None),
    (S.SERVING, obs(alive_nodes=2, registered_workers=1), T.NODE_LOST),
    (S.SERVING, obs(alive_nodes=3, registered_workers=2, health_failures=2), None),
    (S.SERVING, obs(alive_nodes=3, registered_workers=2, health_failures=3), T.HEALTH_FAILED),
    (S.SERVING, obs(alive_nodes=3, registered_workers=2, engine_failure="exit 1"), T.ENGINE_FAILED),
    (S.SERVING, obs(alive_nodes=3, registered_workers=2, engine_stalled="replica-b stalled"), T.ENGINE_STALLED),
    # The cause first: a lost node, then a stall, then an engine failure.
    (S.SERVING, obs(alive_nodes=3, registered_workers=2, node_lost="gone", engine_stalled="s"), T.NODE_LOST),
    (S.SERVING, obs(alive_nodes=3, registered_workers=2, engine_stalled="s", engine_failure="e"), T.ENGINE_STALLED),
    (S.DEGRADED, obs(alive_nodes=2, registered_workers=1), None),
    (S.DEGRADED, obs(alive_nodes=3, registered_workers=2), T.RECOVERED),
    (S.DEGRADED, obs(alive_nodes=3, registered_workers=2, health_failures=1), None),
    (S.DEGRADED, obs(alive_nodes=3, registered_workers=2, engine_stalled="replica-b stalled"), None),
    (S.DRAINING, obs(), None),
    (S.DRAINING, obs(drained=True), T.DRAINED),
    (S.DRAINING, obs(drain_requested="again"), None),
    (S.STOPPED, obs(fatal="x", drain_requested="y"), None),
]

WORKER_CASES = [
    (S.INIT, obs(), T.START),
    (S.JOINING, obs(), None),
    (S.JOINING, obs(joined=True, my_epoch=4), T.JOINED),
    (S.WAITING_FOR_WORKERS, obs(cluster_state=S.WAITING_FOR_WORKERS), None),
    (S.WAITING_FOR_WORKERS, obs(cluster_state=S.SERVING), T.CLUSTER_SERVING),
    (S.WAITING_FOR_WORKERS, obs(health_failures=3), T.FATAL),
    (S.SERVING, obs(cluster_state=S.SERVING), None),
    (S.SERVING, obs(cluster_state=S.DEGRADED), T.CLUSTER_DEGRADED),
    (S.SERVING, obs(cluster_state=S.SERVING, health_failures=2), None),
    (S.SERVING, obs(cluster_state=S.SERVING, health_failures=3), T.HEAD_LOST),
    (S.DEGRADED, obs(cluster_state=S.DEGRADED), None),
    (S.DEGRADED, obs(cluster_state=S.SERVING), T.RECOVERED),
    (S.DEGRADED, obs(cluster_state=S.SERVING, health_failures=1), None),
    (S.DEGRADED, obs(cluster_epoch=5, my_epoch=4), T.REJOIN),
    (S.DEGRADED, obs(health_failures=3, head_reachable=False), None),
    (S.DEGRADED, obs(health_failures=3, head_reachable=True), T.REJOIN),
    # Fenced: the coordinator counts the node as lost (Ray declared it dead after a hang).
    (S.SERVING, obs(cluster_state=S.SERVING, fenced=True), T.CLUSTER_DEGRADED),
    (S.DEGRADED, obs(cluster_state=S.SERVING, fenced=True), T.REJOIN),
    (S.DRAINING, obs(drained=True), T.DRAINED),
]


@pytest.mark.parametrize("state,o,expected", HEAD_CASES)
def test_head_decisions(state, o, expected):
    assert trig(Role.HEAD, state, o) == expected


@pytest.mark.parametrize("state,o,expected", WORKER_CASES)
def test_worker_decisions(state, o, expected):
    assert trig(Role.WORKER, state, o) == expected


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("state", [s for s in State if s not in (S.DRAINING, S.STOPPED)])
def test_drain_request_wins_in_every_live_state(role, state):
    d = decide(role, state, obs(drain_requested="SIGTERM received"), LIMITS)
    assert d == Decision(T.DRAIN, "SIGTERM received")


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("state", [s for s in State if s is not S.STOPPED])
def test_fatal_wins_over_everything(role, state):
    d = decide(role, state, obs(fatal="boom", drain_requested="x", drained=True), LIMITS)
    assert d == Decision(T.FATAL, "boom")


def test_degraded_deadline_drains():
    limits = Limits(expected_nodes=3, degraded_timeout=30)
    assert trig(Role.HEAD, S.DEGRADED, obs(alive_nodes=2, now=129.0), limits) is None
    d = decide(Role.HEAD, S.DEGRADED, obs(alive_nodes=2, now=130.0), limits)
    assert d.trigger is T.DRAIN and "30" in d.reason


def test_wait_timeout_reason_names_what_is_missing():
    d = decide(Role.HEAD, S.WAITING_FOR_WORKERS, obs(alive_nodes=2, registered_workers=1, now=161.0), LIMITS)
    assert d.trigger is T.FATAL
    assert "2/3 nodes alive" in d.reason and "60s" in d.reason


def test_a_stall_is_decided_with_the_gateways_reason():
    why = "replica-b stalled: no token for 2.1s on 3 streams; its engine's counters did not move"
    d = decide(Role.HEAD, S.SERVING, obs(alive_nodes=3, registered_workers=2, engine_stalled=why), LIMITS)
    assert d == Decision(T.ENGINE_STALLED, why)
