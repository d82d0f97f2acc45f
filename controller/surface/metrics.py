"""Prometheus metrics for the control port's `/metrics` (prometheus-client).

Two kinds of figures:
- events, observed as they happen: transitions of this node, time to detect
  a failure and to recover from it, and the gateway's requests (latency, time
  to first streamed chunk, in flight);
- the cluster's state, refreshed from `/status` at each scrape: every node's
  state (workers' included, as the coordinator knows them), alive and expected
  nodes, replicas by state, workers' transitions, and retries by operation.

Names follow Prometheus conventions: `llmctl_` prefix, base units in the name
(`_seconds`), `_total` on counters. Each Metrics has its own registry.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from states import State

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The lifecycle states, and LOST: a member whose node died, as the coordinator marks it.
NODE_STATES = (*(s.value for s in State), "LOST")
DETECTION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120)
RECOVERY_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.node_state = Gauge("llmctl_node_state", "1 for each node's current lifecycle state, 0 for the others",
                                ["node_id", "role", "state"], registry=r)
        self.transitions = Counter("llmctl_transitions", "Lifecycle transitions, by node role, from, to and trigger",
                                   ["role", "from", "to", "trigger"], registry=r)
        self.nodes_alive = Gauge("llmctl_nodes_alive", "Ray nodes alive in the cluster", registry=r)
        self.nodes_expected = Gauge("llmctl_nodes_expected", "Nodes the cluster is meant to have", registry=r)
        self.replicas = Gauge("llmctl_replicas", "Engine replicas by state", ["state"], registry=r)
        self.detection = Histogram("llmctl_detection_seconds",
                                   "From a failure's first sign (last heartbeat of a lost node, last good check of "
                                   "an engine, first failed health check) to DEGRADED", buckets=DETECTION_BUCKETS,
                                   registry=r)
        self.recovery = Histogram("llmctl_recovery_seconds", "Time in DEGRADED before SERVING again",
                                  buckets=RECOVERY_BUCKETS, registry=r)
        self.request_duration = Histogram("llmctl_request_duration_seconds",
                                          "Gateway requests, from receipt to the last byte", ["route", "code"],
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_chunk = Histogram("llmctl_request_time_to_first_chunk_seconds",
                                             "Streaming gateway requests, from receipt to the first chunk relayed "
                                             "(time to first token, as the gateway sees it)", ["route"],
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("llmctl_requests_in_flight", "Gateway requests in flight", registry=r)
        self.retries = Counter("llmctl_retries", "Retries by operation: worker_join (join attempts after the first), "
                               "engine_restart (engine restarts), gateway_request (requests sent again to another "
                               "replica)", ["operation"], registry=r)
        for operation in ("worker_join", "engine_restart", "gateway_request"):
            self.retries.labels(operation=operation)
        self._seen: dict[tuple[str, str], float] = {}  # monotonic totals read from snapshots

    # -- events ------------------------------------------------------------------------------

    def transition(self, role: str, record: dict[str, Any]) -> None:
        self.transitions.labels(role=role, **{"from": record["from"], "to": record["to"]},
                                trigger=record["trigger"]).inc()

    def observe_request(self, route: str, status: int, seconds: float, first_chunk_s: float | None) -> None:
        self.request_duration.labels(route=route, code=str(status)).observe(seconds)
        if first_chunk_s is not None:
            self.time_to_first_chunk.labels(route=route).observe(first_chunk_s)

    # -- the cluster's state, at each scrape ------------------------------------------------

    def _add_total(self, counter_child: Any, key: tuple[str, str], total: float) -> None:
        """Grow a counter to a total read from a snapshot; a total that went down
        (a replica or member started afresh) counts from its new value."""
        before = self._seen.get(key, 0.0)
        counter_child.inc(total - before if total >= before else total)
        self._seen[key] = total

    def refresh(self, status: dict[str, Any], own_role: str) -> None:
        cluster = status["cluster"]
        self.nodes_expected.set(cluster.get("expected_nodes") or 0)
        self.nodes_alive.set(cluster.get("alive_nodes") or 0)
        self.node_state.clear()
        for n in status["nodes"]:
            for state in NODE_STATES:
                self.node_state.labels(node_id=n["node_id"], role=n.get("role") or "unknown",
                                       state=state).set(1 if n.get("state") == state else 0)
        self.replicas.clear()
        by_state: dict[str, int] = {}
        for rep in status["replicas"]:
            by_state[rep.get("state") or "UNKNOWN"] = by_state.get(rep.get("state") or "UNKNOWN", 0) + 1
        for state, count in by_state.items():
            self.replicas.labels(state=state).set(count)
        gateway = status.get("gateway") or {}
        self.in_flight.set(gateway.get("in_flight", 0))
        self._add_total(self.retries.labels(operation="gateway_request"), ("gateway", "retries"),
                        gateway.get("counts", {}).get("retries", 0))
        for rep in status["replicas"]:
            self._add_total(self.retries.labels(operation="engine_restart"), ("restarts", rep["replica_id"]),
                            rep.get("restarts") or 0)
        for n in status["nodes"]:
            attempt = n.get("join_attempt")
            if attempt:
                self._add_total(self.retries.labels(operation="worker_join"),
                                ("join", f"{n['node_id']}@{n.get('epoch')}"), attempt - 1)
        # Other nodes' transitions, as the coordinator counted them (ours are counted as they happen).
        for key, total in (status.get("transition_counts") or {}).items():
            role, source, dest, trigger = key.split("|")
            if role == own_role:
                continue
            self._add_total(self.transitions.labels(role=role, **{"from": source, "to": dest}, trigger=trigger),
                            ("transitions", key), total)

    def render(self) -> bytes:
        return generate_latest(self.registry)
