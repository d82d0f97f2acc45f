"""Metrics from events and from /status snapshots: names, labels, and counters
that only grow even when the totals they are read from start afresh."""

from prometheus_client.parser import text_string_to_metric_families

from controller.lifecycle.loop import Board
from controller.surface.metrics import Metrics


def samples(m: Metrics) -> dict:
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}


def status(restarts=0, retries=0, counts=None, join_attempt=1):
    return {"cluster": {"state": "SERVING", "expected_nodes": 2, "alive_nodes": 2},
            "nodes": [{"node_id": "head-a", "role": "head", "state": "SERVING"},
                      {"node_id": "worker-b", "role": "worker", "state": "LOST", "epoch": 1,
                       "join_attempt": join_attempt}],
            "replicas": [{"replica_id": "r1", "state": "READY", "restarts": restarts},
                         {"replica_id": "r2", "state": "STARTING", "restarts": 0}],
            "gateway": {"in_flight": 3, "counts": {"retries": retries}},
            "transition_counts": counts or {}}


def test_a_scrape_shows_nodes_replicas_and_load():
    m = Metrics()
    m.refresh(status(), own_role="head")
    s = samples(m)
    assert s[("llmctl_node_state", frozenset({"node_id": "worker-b", "role": "worker", "state": "LOST"}.items()))] == 1
    assert s[("llmctl_node_state", frozenset({"node_id": "head-a", "role": "head", "state": "DEGRADED"}.items()))] == 0
    assert s[("llmctl_replicas", frozenset({"state": "READY"}.items()))] == 1
    assert s[("llmctl_replicas", frozenset({"state": "STARTING"}.items()))] == 1
    assert (s[("llmctl_nodes_alive", frozenset())], s[("llmctl_requests_in_flight", frozenset())]) == (2, 3)
    for op in ("worker_join", "engine_restart", "gateway_request"):
        assert s[("llmctl_retries_total", frozenset({"operation": op}.items()))] == 0


def test_counters_read_from_snapshots_only_grow():
    m = Metrics()
    key = "worker|JOINING|WAITING_FOR_WORKERS|joined"
    m.refresh(status(restarts=2, retries=5, counts={key: 2, "head|INIT|JOINING|start": 1}, join_attempt=3), "head")
    m.refresh(status(restarts=3, retries=5, counts={key: 3}, join_attempt=3), "head")
    m.refresh(status(restarts=1, retries=6, counts={key: 3}, join_attempt=3), "head")  # r1 made afresh: 1 new
    s = samples(m)
    assert s[("llmctl_retries_total", frozenset({"operation": "engine_restart"}.items()))] == 4
    assert s[("llmctl_retries_total", frozenset({"operation": "gateway_request"}.items()))] == 6
    assert s[("llmctl_retries_total", frozenset({"operation": "worker_join"}.items()))] == 2
    joined = {"role": "worker", "from": "JOINING", "to": "WAITING_FOR_WORKERS", "trigger": "joined"}
    assert s[("llmctl_transitions_total", frozenset(joined.items()))] == 3
    # The head's own transitions are counted as they happen, not again from the coordinator.
    assert not any(name == "llmctl_transitions_total" and dict(labels).get("role") == "head"
                   for name, labels in s)


def test_events_requests_and_transitions():
    m = Metrics()
    m.transition("head", {"from": "SERVING", "to": "DEGRADED", "trigger": "node_lost"})
    m.observe_request("/v1/completions", 200, 0.04, 0.01)
    m.observe_request("/v1/completions", 503, 0.001, None)
    m.detection.observe(1.5)
    s = samples(m)
    assert s[("llmctl_transitions_total", frozenset({"role": "head", "from": "SERVING", "to": "DEGRADED",
                                                     "trigger": "node_lost"}.items()))] == 1
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
