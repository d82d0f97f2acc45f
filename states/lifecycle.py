"""The lifecycle vocabulary and the transition tables, as data.

This module is the one place a reader looks to learn which transitions exist.
It imports nothing that touches the world (no Ray, subprocess or HTTP).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    HEAD = "head"
    WORKER = "worker"


class State(str, Enum):
    INIT = "INIT"
    JOINING = "JOINING"
    WAITING_FOR_WORKERS = "WAITING_FOR_WORKERS"
    SERVING = "SERVING"
    DEGRADED = "DEGRADED"
    DRAINING = "DRAINING"
    STOPPED = "STOPPED"


class Trigger(str, Enum):
    START = "start"
    HEAD_UP = "head_up"
    CLUSTER_READY = "cluster_ready"
    NODE_LOST = "node_lost"
    ENGINE_FAILED = "engine_failed"
    ENGINE_STALLED = "engine_stalled"
    HEALTH_FAILED = "health_failed"
    JOINED = "joined"
    CLUSTER_SERVING = "cluster_serving"
    HEAD_LOST = "head_lost"
    CLUSTER_DEGRADED = "cluster_degraded"
    REJOIN = "rejoin"
    RECOVERED = "recovered"
    DRAIN = "drain"
    DRAINED = "drained"
    FATAL = "fatal"


@dataclass(frozen=True)
class Transition:
    trigger: Trigger
    source: State
    dest: State


ALL_STATES: tuple[State, ...] = tuple(State)
# A node that joined and has not begun to leave: its monitors and parts run.
LIVE_STATES: tuple[State, ...] = (State.WAITING_FOR_WORKERS, State.SERVING, State.DEGRADED)
NOT_STOPPED: tuple[State, ...] = tuple(s for s in State if s is not State.STOPPED)
# DRAINING already drains; a second drain request is not a transition.
DRAINABLE: tuple[State, ...] = tuple(
    s for s in State if s not in (State.DRAINING, State.STOPPED)
)


def _expand(trigger: Trigger, sources: tuple[State, ...], dest: State) -> list[Transition]:
    return [Transition(trigger, s, dest) for s in sources]


S = State
T = Trigger

HEAD_TABLE: tuple[Transition, ...] = (
    Transition(T.START, S.INIT, S.JOINING),
    Transition(T.HEAD_UP, S.JOINING, S.WAITING_FOR_WORKERS),
    Transition(T.CLUSTER_READY, S.WAITING_FOR_WORKERS, S.SERVING),
    Transition(T.NODE_LOST, S.SERVING, S.DEGRADED),
    Transition(T.ENGINE_FAILED, S.SERVING, S.DEGRADED),
    Transition(T.ENGINE_STALLED, S.SERVING, S.DEGRADED),
    Transition(T.HEALTH_FAILED, S.SERVING, S.DEGRADED),
    Transition(T.RECOVERED, S.DEGRADED, S.SERVING),
    *_expand(T.DRAIN, DRAINABLE, S.DRAINING),
    Transition(T.DRAINED, S.DRAINING, S.STOPPED),
    *_expand(T.FATAL, NOT_STOPPED, S.STOPPED),
)

WORKER_TABLE: tuple[Transition, ...] = (
    Transition(T.START, S.INIT, S.JOINING),
    Transition(T.JOINED, S.JOINING, S.WAITING_FOR_WORKERS),
    Transition(T.CLUSTER_SERVING, S.WAITING_FOR_WORKERS, S.SERVING),
    Transition(T.HEAD_LOST, S.SERVING, S.DEGRADED),
    Transition(T.CLUSTER_DEGRADED, S.SERVING, S.DEGRADED),
    Transition(T.RECOVERED, S.DEGRADED, S.SERVING),
    Transition(T.REJOIN, S.DEGRADED, S.JOINING),
    *_expand(T.DRAIN, DRAINABLE, S.DRAINING),
    Transition(T.DRAINED, S.DRAINING, S.STOPPED),
    *_expand(T.FATAL, NOT_STOPPED, S.STOPPED),
)


def table_for(role: Role) -> tuple[Transition, ...]:
    return HEAD_TABLE if role is Role.HEAD else WORKER_TABLE


def next_state(role: Role, state: State, trigger: Trigger) -> State | None:
    """The destination of `trigger` from `state`, or None when it is not allowed."""
    for t in table_for(role):
        if t.source is state and t.trigger is trigger:
            return t.dest
    return None
