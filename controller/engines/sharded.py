"""Sharded mode (GPUs): one vLLM engine spanning the cluster's nodes.

The head runs `vllm serve`'s server with `--tensor-parallel-size T
--pipeline-parallel-size P --distributed-executor-backend ray` as a supervised
subprocess, with `RAY_ADDRESS` pointing at the cluster. vLLM reserves its own
placement group for its workers: the engine is a plain child process of the
head controller, never a Ray task or actor inside a placement group of ours
(an outer group would hold the GPUs vLLM's own group asks for, and it would
wait forever).

A sharded engine cannot lose a node and keep serving: when the node count drops
below the expected one the engine is stopped, and it is launched again once the
count is back.
"""

from __future__ import annotations

import enum
from typing import Callable

from controller.cluster.records import ReplicaState, ReplicaStatus
from controller.engines.engine import STATS_ENV, EngineSpec
from controller.logs import log
from controller.preflight import gpu_fit_problem
from controller.engines.supervisor import FAILED, READY, EngineSupervisor

REPLICA_ID = "sharded-engine"


def sharded_spec(model: str, served_name: str, host: str, port: int, tensor_parallel: int,
                 pipeline_parallel: int, ray_address: str) -> EngineSpec:
    """The engine's command-line flags and environment for one TP x PP layout."""
    return EngineSpec(
        model=model, served_name=served_name, host=host, port=port,
        extra_args=(
            "--tensor-parallel-size", str(tensor_parallel),
            "--pipeline-parallel-size", str(pipeline_parallel),
            "--distributed-executor-backend", "ray",
        ),
        env={
            "RAY_ADDRESS": ray_address,
            # vLLM's driver must name the same IP Ray gave the head node, or it
            # cannot find itself among the Ray nodes (a common multi-node failure).
            "VLLM_HOST_IP": host,
            **STATS_ENV,  # the token counters that tell busy from stalled
        },
    )


class Action(enum.Enum):
    NONE = "none"    # running, or nothing to do
    WAIT = "wait"    # not running, and it must not start yet
    START = "start"
    STOP = "stop"


def next_action(running: bool, alive_nodes: int | None, expected_nodes: int) -> Action:
    """What the sharded engine needs, given the node count."""
    if alive_nodes is None or alive_nodes < expected_nodes:
        return Action.STOP if running else Action.WAIT
    return Action.NONE if running else Action.START


class ShardedEngine:
    """The head's sharded engine: launched once every expected node is alive and the
    GPUs fit, stopped on a node loss, launched again when the count is back."""

    def __init__(self, make_supervisor: Callable[[], EngineSupervisor], tensor_parallel: int,
                 pipeline_parallel: int) -> None:
        self.make_supervisor = make_supervisor
        self.tensor_parallel = tensor_parallel
        self.pipeline_parallel = pipeline_parallel
        self.supervisor: EngineSupervisor | None = None
        self.launches = 0
        self.ever_ready = False
        self.stopped_reason: str | None = None
        self.restarts_of_gone = 0  # restarts of engines stopped on a node loss

    async def reconcile(self, alive_nodes: int | None, expected_nodes: int, cluster_gpus: float) -> str | None:
        """One step; returns a problem that makes launching impossible (the GPUs do not fit)."""
        action = next_action(self.supervisor is not None, alive_nodes, expected_nodes)
        if action is Action.STOP:
            assert self.supervisor is not None
            self.stopped_reason = f"{alive_nodes}/{expected_nodes} nodes alive: the engine spans them all"
            log.warning("sharded_engine_stopping", reason=self.stopped_reason)
            await self.supervisor.stop()
            self.restarts_of_gone += self.supervisor.restarts
            self.supervisor = None
        elif action is Action.START:
            problem = gpu_fit_problem(self.tensor_parallel, self.pipeline_parallel, cluster_gpus)
            if problem:
                return problem
            self.launches += 1
            log.info("sharded_engine_launching", launch=self.launches, nodes=alive_nodes,
                     tensor_parallel=self.tensor_parallel, pipeline_parallel=self.pipeline_parallel)
            self.supervisor = self.make_supervisor()
            self.supervisor.start()
        if self.supervisor is not None and self.supervisor.state == READY:
            self.ever_ready = True
        return None

    def statuses(self) -> list[ReplicaStatus]:
        if self.supervisor is None:
            return [ReplicaStatus(replica_id=REPLICA_ID, node_id=None, url=None, state=ReplicaState.STOPPED,
                                  reason=self.stopped_reason)]
        return [self.supervisor.status()]

    def ready(self) -> bool:
        return self.supervisor is not None and self.supervisor.state == READY

    def restarts_total(self) -> int:
        return self.restarts_of_gone + (self.supervisor.restarts if self.supervisor else 0)

    def failure(self) -> str | None:
        if not self.ever_ready or self.ready():
            return None
        s = self.statuses()[0]
        return f"{REPLICA_ID} is {s.state.value}: {s.reason or 'no reason given'}"

    def given_up(self) -> str | None:
        if self.supervisor is not None and self.supervisor.state == FAILED:
            return f"{REPLICA_ID} failed: {self.supervisor.reason}"
        return None

    async def stop(self) -> set[int]:
        if self.supervisor is None:
            return set()
        left = await self.supervisor.stop()
        self.supervisor = None
        return left
