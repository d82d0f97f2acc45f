"""The pure decision function: what the world looks like -> which trigger to fire.

Level-triggered: `decide` sees a full observation each tick and returns at most
one trigger. A missed event costs one tick, never a stuck node.
"""

from __future__ import annotations

from dataclasses import dataclass

from states.lifecycle import Role, State, Trigger, next_state


@dataclass(frozen=True)
class Limits:
    """Bounds and thresholds the decisions depend on (all times in seconds)."""

    expected_nodes: int = 1
    wait_timeout: float = 300.0
    # 0 disables the deadline: DEGRADED then lasts until recovery or a drain.
    degraded_timeout: float = 0.0
    # Consecutive failed health checks before the node calls the health lost.
    failure_threshold: int = 3


@dataclass(frozen=True)
class Observation:
    """What the loop knows at one instant. Monitors and effects fill it in."""

    now: float
    entered_at: float
    fatal: str | None = None
    drain_requested: str | None = None
    drained: bool = False
    # Consecutive failed GCS / coordinator checks; reset to 0 on a success.
    health_failures: int = 0
    last_health_error: str | None = None
    # head
    head_up: bool = False
    alive_nodes: int | None = None
    registered_workers: int = 0
    engines_ready: bool = True
    engine_failure: str | None = None
    # A failing replica's node is gone (its raylet refuses connections) before
    # Ray's own node count says so: why, naming the first sign.
    node_lost: str | None = None
    # A replica answers `/health` but its streams make no token progress, and its
    # engine's own token counters confirm it: why, naming the replica.
    engine_stalled: str | None = None
    # worker
    joined: bool = False
    cluster_state: State | None = None
    cluster_epoch: int | None = None
    my_epoch: int | None = None
    head_reachable: bool = False
    # The coordinator's desired state is "drain": the head asked the cluster to drain.
    cluster_draining: bool = False
    # The coordinator counts this worker as lost (Ray declared its node dead, e.g.
    # after a hang): it is fenced out and must rejoin.
    fenced: bool = False

    @property
    def in_state_s(self) -> float:
        return max(0.0, self.now - self.entered_at)


@dataclass(frozen=True)
class Decision:
    trigger: Trigger
    reason: str


def decide(role: Role, state: State, obs: Observation, limits: Limits) -> Decision | None:
    """Pick the one trigger the observation calls for in `state`, or None."""
    if state is State.STOPPED:
        return None
    if obs.fatal:
        return Decision(Trigger.FATAL, obs.fatal)
    if state is State.DRAINING:
        return Decision(Trigger.DRAINED, "drain complete") if obs.drained else None
    if obs.drain_requested:
        return Decision(Trigger.DRAIN, obs.drain_requested)
    if obs.cluster_draining:
        return Decision(Trigger.DRAIN, "the head asked the cluster to drain")
    if state is State.INIT:
        return Decision(Trigger.START, "configuration valid")
    if (
        state is State.DEGRADED
        and limits.degraded_timeout > 0
        and obs.in_state_s >= limits.degraded_timeout
    ):
        return Decision(
            Trigger.DRAIN, f"degraded for more than {limits.degraded_timeout:g}s"
        )
    decision = (_decide_head if role is Role.HEAD else _decide_worker)(state, obs, limits)
    # A decision the table does not allow is a bug in this module, not an event.
    assert decision is None or next_state(role, state, decision.trigger) is not None
    return decision


def _health_lost(obs: Observation, limits: Limits) -> bool:
    return obs.health_failures >= limits.failure_threshold


def _health_text(obs: Observation) -> str:
    return f"{obs.health_failures} consecutive health checks failed: {obs.last_health_error}"


def _head_ready(obs: Observation, limits: Limits) -> tuple[bool, str]:
    alive = obs.alive_nodes if obs.alive_nodes is not None else 0
    need_workers = limits.expected_nodes - 1
    text = (
        f"{alive}/{limits.expected_nodes} nodes alive, "
        f"{obs.registered_workers}/{need_workers} workers registered"
    )
    ready = (
        alive >= limits.expected_nodes
        and obs.registered_workers >= need_workers
        and obs.engines_ready
        and obs.health_failures == 0
    )
    return ready, text


def _decide_head(state: State, obs: Observation, limits: Limits) -> Decision | None:
    if state is State.JOINING:
        return Decision(Trigger.HEAD_UP, "ray head up, coordinator attached") if obs.head_up else None
    if state is State.WAITING_FOR_WORKERS:
        ready, text = _head_ready(obs, limits)
        if ready:
            return Decision(Trigger.CLUSTER_READY, text)
        if obs.in_state_s >= limits.wait_timeout:
            return Decision(
                Trigger.FATAL, f"workers did not join within {limits.wait_timeout:g}s: {text}"
            )
        return None
    if state is State.SERVING:
        if _health_lost(obs, limits):
            return Decision(Trigger.HEALTH_FAILED, _health_text(obs))
        if obs.alive_nodes is not None and obs.alive_nodes < limits.expected_nodes:
            return Decision(
                Trigger.NODE_LOST,
                f"{obs.alive_nodes}/{limits.expected_nodes} nodes alive",
            )
        if obs.node_lost:
            return Decision(Trigger.NODE_LOST, obs.node_lost)
        if obs.engine_stalled:
            return Decision(Trigger.ENGINE_STALLED, obs.engine_stalled)
        if obs.engine_failure:
            return Decision(Trigger.ENGINE_FAILED, obs.engine_failure)
        return None
    if state is State.DEGRADED:
        ready, text = _head_ready(obs, limits)
        if ready and not obs.engine_failure and not obs.node_lost and not obs.engine_stalled:
            return Decision(Trigger.RECOVERED, text)
        return None
    return None


def _decide_worker(state: State, obs: Observation, limits: Limits) -> Decision | None:
    if state is State.JOINING:
        return Decision(Trigger.JOINED, f"registered under epoch {obs.my_epoch}") if obs.joined else None
    if state is State.WAITING_FOR_WORKERS:
        if _health_lost(obs, limits):
            return Decision(Trigger.FATAL, "head lost before the cluster served: " + _health_text(obs))
        if obs.cluster_state is State.SERVING:
            return Decision(Trigger.CLUSTER_SERVING, "coordinator reports the cluster SERVING")
        return None
    if state is State.SERVING:
        if _health_lost(obs, limits):
            return Decision(Trigger.HEAD_LOST, _health_text(obs))
        if obs.fenced:
            return Decision(Trigger.CLUSTER_DEGRADED, "the coordinator counts this node as lost")
        if obs.cluster_state is State.DEGRADED:
            return Decision(Trigger.CLUSTER_DEGRADED, "coordinator reports the cluster DEGRADED")
        return None
    if state is State.DEGRADED:
        if obs.fenced:
            return Decision(Trigger.REJOIN, "the coordinator counts this node as lost: Ray declared it dead")
        if (
            obs.cluster_epoch is not None
            and obs.my_epoch is not None
            and obs.cluster_epoch != obs.my_epoch
        ):
            return Decision(
                Trigger.REJOIN, f"cluster epoch is {obs.cluster_epoch}, joined under {obs.my_epoch}"
            )
        if _health_lost(obs, limits) and obs.head_reachable:
            return Decision(Trigger.REJOIN, "head answers again but the coordinator does not: a new cluster")
        if obs.health_failures == 0 and obs.cluster_state is State.SERVING:
            return Decision(Trigger.RECOVERED, "coordinator reports the cluster SERVING")
        return None
    return None
