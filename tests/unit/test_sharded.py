"""Sharded mode without GPUs: the exact command line and environment for several
TP x PP layouts, and the relaunch logic with a fake supervisor."""

import sys

import pytest

from controller.engines.engine import vllm_command
from controller.engines.sharded import REPLICA_ID, Action, ShardedEngine, next_action, sharded_spec


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (4, 2), (8, 4)])
def test_command_and_environment_for_each_layout(tp, pp):
    spec = sharded_spec("/models/llama-70b", "llama-70b", "10.0.0.1", 8001, tp, pp, "10.0.0.1:6379")
    assert vllm_command(spec) == [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", "/models/llama-70b",
        "--served-model-name", "llama-70b",
        "--host", "10.0.0.1",
        "--port", "8001",
        "--disable-uvicorn-access-log",
        "--tensor-parallel-size", str(tp),
        "--pipeline-parallel-size", str(pp),
        "--distributed-executor-backend", "ray",
    ]
    # Stats logging stays on (no --disable-log-stats): /metrics keeps its token counters.
    assert spec.env == {"RAY_ADDRESS": "10.0.0.1:6379", "VLLM_HOST_IP": "10.0.0.1", "VLLM_LOG_STATS_INTERVAL": "60"}


def test_engine_environment_drops_the_controllers_driver_settings(monkeypatch):
    from controller.cluster.ray_adapter import _DRIVER_ENV, child_env

    monkeypatch.setenv("RAY_ENABLE_AUTO_CONNECT", "0")
    spec = sharded_spec("m", "m", "10.0.0.1", 8001, 2, 2, "10.0.0.1:6379")
    env = child_env(spec.env)
    assert not set(_DRIVER_ENV) & set(env)  # vLLM's own ray.init must be able to connect
    assert env["RAY_ADDRESS"] == "10.0.0.1:6379"


@pytest.mark.parametrize("running,alive,expected,action", [
    (False, None, 3, Action.WAIT),
    (False, 2, 3, Action.WAIT),
    (False, 3, 3, Action.START),
    (True, 3, 3, Action.NONE),
    (True, 2, 3, Action.STOP),
    (False, 4, 3, Action.START),
])
def test_next_action(running, alive, expected, action):
    assert next_action(running, alive, expected) is action


class FakeSupervisor:
    """Stands in for the engine supervisor: records start/stop, state set by the test."""

    made: list["FakeSupervisor"] = []

    def __init__(self):
        self.state, self.reason, self.started, self.stopped = "STARTING", None, False, False
        self.restarts = 0
        FakeSupervisor.made.append(self)

    def start(self):
        self.started = True

    async def stop(self):
        self.stopped = True
        return set()

    def status(self):
        return {"replica_id": REPLICA_ID, "url": "http://10.0.0.1:8001", "state": self.state,
                "reason": self.reason, "restarts": 0, "pid": 1}


async def test_relaunched_after_a_node_loss_once_the_count_is_back():
    FakeSupervisor.made.clear()
    engine = ShardedEngine(FakeSupervisor, tensor_parallel=2, pipeline_parallel=2)
    assert await engine.reconcile(2, 3, cluster_gpus=4) is None
    assert FakeSupervisor.made == []  # not every node is there yet
    await engine.reconcile(3, 3, cluster_gpus=4)
    first = FakeSupervisor.made[0]
    assert first.started and not engine.ready() and engine.failure() is None  # starting, not failing
    first.state = "READY"
    await engine.reconcile(3, 3, cluster_gpus=4)
    assert engine.ready() and engine.statuses()[0]["state"] == "READY"

    await engine.reconcile(2, 3, cluster_gpus=2)  # a node is lost: the engine spanned it
    assert first.stopped and not engine.ready()
    assert engine.failure() == f"{REPLICA_ID} is STOPPED: 2/3 nodes alive: the engine spans them all"
    await engine.reconcile(2, 3, cluster_gpus=2)
    assert len(FakeSupervisor.made) == 1  # no launch while a node is missing

    await engine.reconcile(3, 3, cluster_gpus=4)
    second = FakeSupervisor.made[1]
    assert second.started and engine.launches == 2
    second.state = "READY"
    await engine.reconcile(3, 3, cluster_gpus=4)
    assert engine.ready() and engine.failure() is None


async def test_layout_larger_than_the_clusters_gpus_is_a_clear_problem():
    FakeSupervisor.made.clear()
    engine = ShardedEngine(FakeSupervisor, tensor_parallel=4, pipeline_parallel=2)
    problem = await engine.reconcile(2, 2, cluster_gpus=4)
    assert problem == ("sharded mode needs tensor-parallel-size x pipeline-parallel-size = 4 x 2 = 8 GPUs; "
                       "the cluster has 4")
    assert FakeSupervisor.made == []


async def test_given_up_engine_is_reported():
    FakeSupervisor.made.clear()
    engine = ShardedEngine(FakeSupervisor, 1, 1)
    await engine.reconcile(1, 1, cluster_gpus=1)
    FakeSupervisor.made[0].state, FakeSupervisor.made[0].reason = "FAILED", "engine exited with code 1: OOM"
    assert engine.given_up() == f"{REPLICA_ID} failed: engine exited with code 1: OOM"
