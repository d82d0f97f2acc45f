"""Metrics from events and from /status documents: names and labels; the
cluster's facts read at scrape time from their owners, whose totals only grow
even when what they count starts afresh (a replica made anew, a member that
registers again)."""

from prometheus_client.parser import text_string_to_metric_families

from controller.cluster.coordinator import CoordinatorState
from controller.cluster.records import Member, ReplicaState, ReplicaStatus
from controller.engines.replicas import ReplicaSet
from controller.lifecycle.loop import Board
from controller.surface.metrics import Metrics


def samples(m: Metrics, status_doc=None) -> dict:
    text = m.render(status_doc or {"cluster": {}, "nodes": [], "replicas": []}).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def status(restarts=0, retries=0, counts=None, join_retries=0):
    return {"cluster": {"state": "SERVING", "expected_nodes": 2, "alive_nodes": 2},
            "nodes": [{"node_id": "head-a", "role": "head", "state": "SERVING"},
                      {"node_id": "worker-b", "role": "worker", "state": "LOST", "epoch": 1}],
            "replicas": [{"replica_id": "r1", "state": "READY", "restarts": restarts},
                         {"replica_id": "r2", "state": "STARTING", "restarts": 0}],
            "gateway": {"in_flight": 3, "counts": {"retries": retries}},
            "transition_counts": counts or {},
            "retries": {"worker_join": join_retries, "engine_restart": restarts, "gateway_request": retries}}


def test_a_scrape_shows_nodes_replicas_and_load():
    s = samples(Metrics(), status())
    assert s[("llmctl_node_state", frozenset({"node_id": "worker-b", "role": "worker", "state": "LOST"}.items()))] == 1
    assert s[("llmctl_node_state", frozenset({"node_id": "head-a", "role": "head", "state": "DEGRADED"}.items()))] == 0
    assert s[("llmctl_replicas", frozenset({"state": "READY"}.items()))] == 1
    assert s[("llmctl_replicas", frozenset({"state": "STARTING"}.items()))] == 1
    assert (s[("llmctl_nodes_alive", frozenset())], s[("llmctl_requests_in_flight", frozenset())]) == (2, 3)
    for op in ("worker_join", "engine_restart", "gateway_request"):
        assert s[("llmctl_retries_total", frozenset({"operation": op}.items()))] == 0


def test_every_roles_transitions_come_from_the_coordinators_counts():
    joined = {"role": "worker", "from": "JOINING", "to": "WAITING_FOR_WORKERS", "trigger": "joined"}
    lost = {"role": "head", "from": "SERVING", "to": "DEGRADED", "trigger": "node_lost"}
    s = samples(Metrics(), status(counts={"worker|JOINING|WAITING_FOR_WORKERS|joined": 3,
                                          "head|SERVING|DEGRADED|node_lost": 1}, restarts=4, retries=6,
                                  join_retries=2))
    assert s[("llmctl_transitions_total", frozenset(joined.items()))] == 3
    assert s[("llmctl_transitions_total", frozenset(lost.items()))] == 1
    assert s[("llmctl_retries_total", frozenset({"operation": "engine_restart"}.items()))] == 4
    assert s[("llmctl_retries_total", frozenset({"operation": "gateway_request"}.items()))] == 6
    assert s[("llmctl_retries_total", frozenset({"operation": "worker_join"}.items()))] == 2


def test_owned_totals_only_grow_when_what_they_count_starts_afresh():
    rs = ReplicaSet(None, model="tiny", served_name="tiny")
    rs.handles["a"] = object()
    rs.last["a"] = ReplicaStatus("replica-a", "a", None, ReplicaState.READY, restarts=3)
    assert rs.restarts_total() == 3
    rs._forget("a")  # its node went: the replica is dropped, its restarts are not
    rs.last["a"] = ReplicaStatus("replica-a", "a", None, ReplicaState.READY, restarts=1)  # made afresh
    assert rs.restarts_total() == 4
    c = CoordinatorState(epoch=1)
    c.register(Member("w", "worker", join_attempt=3), epoch=1)
    c.register(Member("w", "worker", join_attempt=2), epoch=1)  # the member registers again
    assert c.snapshot().join_retries == 3


def test_events_requests_and_detection():
    m = Metrics()
    m.observe_request("/v1/completions", 200, 0.04, 0.01)
    m.observe_request("/v1/completions", 503, 0.001, None)
    m.detection.observe(1.5)
    s = samples(m)
    assert s[("llmctl_request_duration_seconds_count",
              frozenset({"route": "/v1/completions", "code": "200"}.items()))] == 1
    assert s[("llmctl_request_time_to_first_chunk_seconds_count", frozenset({"route": "/v1/completions"}.items()))] == 1
    assert s[("llmctl_detection_seconds_bucket", frozenset({"le": "2.0"}.items()))] == 1
    assert s[("llmctl_detection_seconds_bucket", frozenset({"le": "1.0"}.items()))] == 0


def test_the_board_keeps_a_failures_first_sign_until_it_clears():
    b = Board()
    b.note_fault("node_lost", 100.0)
    b.note_fault("node_lost", 105.0)  # a later sign of the same failure keeps the first
    b.note_fault("gateway", 102.0)
    assert b.first_fault() == 100.0
    b.clear_fault("node_lost")
    assert b.first_fault() == 102.0
    b.health("gcs", "down")
    assert b.first_fault() == 102.0
    b.clear_faults()
    assert b.first_fault() is None
