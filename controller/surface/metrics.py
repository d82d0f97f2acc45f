"""Prometheus metrics for the control port's `/metrics` (prometheus-client).

Two kinds of figures:
- events, observed as they happen: time to detect a failure and to recover
  from it, and the gateway's requests (latency, time to first streamed chunk);
- the cluster's facts, computed at each scrape from the `/status` document
  (a custom collector), each read from its one owner: every node's state and
  every transition (the coordinator's), alive and expected nodes, replicas by
  state, requests in flight (the gateway's), and retries by operation (worker
  joins: the coordinator; engine restarts: the engine reconciler; requests
  sent again: the gateway), and the gateway's continuations by reason, stalls
  and failed requests by cause. Those totals only grow where they are kept, so
  nothing here keeps a ledger of its own.

Names follow Prometheus conventions: `llmctl_` prefix, base units in the name
(`_seconds`), `_total` on counters. Each Metrics has its own registry.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from controller.cluster.records import MemberState
from controller.serving.outcomes import CONTINUATION_REASONS, FAILURE_CAUSES

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The lifecycle states, and LOST: a member whose node died, as the coordinator marks it.
NODE_STATES = tuple(s.value for s in MemberState)
DETECTION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120)
RECOVERY_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


RETRY_OPERATIONS = ("worker_join", "engine_restart", "gateway_request")


class ClusterFacts:
    """The custom collector: the facts of one `/status` document, as metric families."""

    def __init__(self) -> None:
        self.status: dict[str, Any] | None = None

    def collect(self) -> Iterator[Any]:
        status = self.status or {"cluster": {}, "nodes": [], "replicas": []}
        cluster = status["cluster"]
        alive = GaugeMetricFamily("llmctl_nodes_alive", "Ray nodes alive in the cluster",
                                  value=cluster.get("alive_nodes") or 0)
        expected = GaugeMetricFamily("llmctl_nodes_expected", "Nodes the cluster is meant to have",
                                     value=cluster.get("expected_nodes") or 0)
        node_state = GaugeMetricFamily("llmctl_node_state",
                                       "1 for each node's current lifecycle state, 0 for the others",
                                       labels=["node_id", "role", "state"])
        for n in status["nodes"]:
            for state in NODE_STATES:
                node_state.add_metric([n["node_id"], n.get("role") or "unknown", state],
                                      1 if n.get("state") == state else 0)
        replicas = GaugeMetricFamily("llmctl_replicas", "Engine replicas by state", labels=["state"])
        by_state: dict[str, int] = {}
        for rep in status["replicas"]:
            state = rep.get("state") or "UNKNOWN"
            by_state[state] = by_state.get(state, 0) + 1
        for state, count in sorted(by_state.items()):
            replicas.add_metric([state], count)
        in_flight = GaugeMetricFamily("llmctl_requests_in_flight", "Gateway requests in flight",
                                      value=(status.get("gateway") or {}).get("in_flight", 0))
        transitions = CounterMetricFamily("llmctl_transitions",
                                          "Lifecycle transitions, by node role, from, to and trigger",
                                          labels=["role", "from", "to", "trigger"])
        for key, total in sorted((status.get("transition_counts") or {}).items()):
            transitions.add_metric(key.split("|"), total)
        retries = CounterMetricFamily("llmctl_retries", "Retries by operation: worker_join (join attempts after "
                                      "the first), engine_restart (engine restarts), gateway_request (requests "
                                      "sent again to another replica)", labels=["operation"])
        totals = status.get("retries") or {}
        for operation in RETRY_OPERATIONS:
            retries.add_metric([operation], totals.get(operation, 0))
        gateway = status.get("gateway") or {}
        continuations = CounterMetricFamily("llmctl_continuations", "Answers continued on another replica after "
                                            "theirs failed mid-answer, by reason: disconnect (reset or closed), "
                                            "stall (no progress), drain (its drain deadline passed)",
                                            labels=["reason"])
        for reason in CONTINUATION_REASONS:
            continuations.add_metric([reason], (gateway.get("continuations") or {}).get(reason, 0))
        stalls = CounterMetricFamily("llmctl_stalls", "Replicas found stalled: requests in flight, no token "
                                     "progress, the engine's own counters still", value=gateway.get("stalls") or 0)
        failed = CounterMetricFamily("llmctl_requests_failed", "Requests the gateway answered with an error of its "
                                     "own, by cause", labels=["cause"])
        for cause in FAILURE_CAUSES:
            failed.add_metric([cause], (gateway.get("requests_failed") or {}).get(cause, 0))
        yield from (alive, expected, node_state, replicas, in_flight, transitions, retries, continuations, stalls,
                    failed)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.facts = ClusterFacts()
        r.register(self.facts)
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

    def observe_request(self, route: str, status: int, seconds: float, first_chunk_s: float | None) -> None:
        self.request_duration.labels(route=route, code=str(status)).observe(seconds)
        if first_chunk_s is not None:
            self.time_to_first_chunk.labels(route=route).observe(first_chunk_s)

    def render(self, status: dict[str, Any]) -> bytes:
        """The registry's text, with the cluster's facts taken from `status` (a `/status` document)."""
        self.facts.status = status
        return generate_latest(self.registry)
