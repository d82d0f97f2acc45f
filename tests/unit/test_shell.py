"""The shell without a cluster: the head, the worker, the reconciler and the
monitors on a fake Ray (tests/unit/fakes.py) and the real coordinator. Each
test scripts an incident that a chaos run on a real cluster once found."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from controller.cluster.coordinator import ACTOR_NAME, Coordinator, CoordinatorClient
from controller.cluster.local_cluster import LocalWorkers
from controller.cluster.records import Member, MemberState
from controller.config import load_config
from controller.errors import FatalError
from controller.lifecycle.head import HeadNode
from controller.lifecycle.loop import Board, NodeLoop
from controller.lifecycle.worker import WorkerNode
from controller.surface.cli import limits_for
from states import Role, State

from .fakes import FakeRay, FakeReplica, World

FAST = ["--health-interval", "0.05", "--tick-interval", "0.02", "--health-cli-interval", "60",
        "--drain-timeout", "2", "--ray-port", "6390"]
WORKER_ID, WORKER_IP = "worker-127.0.0.3", "127.0.0.3"


def config(tmp_path, role, *flags):
    env = {"HOME": str(tmp_path)}
    if role == "head":
        return load_config(["--role", "head", "--node-ip-address", "127.0.0.2", *FAST, *flags], env)
    return load_config(["--role", "worker", "--head-address", "127.0.0.2:6390", "--node-ip-address", WORKER_IP,
                        "--join-delay", "0.05", *FAST, *flags], env)


async def until(predicate, timeout=5.0, what="condition"):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(0.01)


class Running:
    """A node and its loop, run as a task; stopped at the end of the test."""

    def __init__(self, node, role, cfg):
        self.node = node
        self.moves = []
        on_moved = node.on_moved

        def record(moved, entry):
            self.moves.append(moved)
            on_moved(moved, entry)
        node.on_moved = record
        self.loop = NodeLoop(role, limits_for(cfg), node.board, node, clock=node.board.clock,
                             tick_interval=cfg.tick_interval)
        self.task = asyncio.get_running_loop().create_task(self.loop.run())

    @property
    def state(self):
        return self.loop.state

    async def reach(self, state, timeout=5.0):
        await until(lambda: self.loop.state is state, timeout, f"{state.value} (now {self.loop.state.value})")

    async def stop(self):
        self.node.board.set(drain_requested="test over")
        await asyncio.wait_for(self.task, 10)
        await self.node.shutdown(1.0)


def start_head(tmp_path, world, *flags, expected_workers=1):
    cfg = config(tmp_path, "head", "--engine", "vllm", "--expected-workers", str(expected_workers), *flags)
    board = Board(clock=asyncio.get_running_loop().time)
    head = HeadNode(cfg, board, FakeRay(world, "127.0.0.2"), replica_actor=FakeReplica)
    return Running(head, Role.HEAD, cfg)


async def join_fake_worker(world) -> CoordinatorClient:
    """A worker as the coordinator sees one: its Ray node, its registration, its reports."""
    ray = FakeRay(world, WORKER_IP)
    await ray.start(["--address", "127.0.0.2:6390"], 1.0)
    coordinator = await CoordinatorClient.attach(ray)
    await coordinator.register(Member(WORKER_ID, "worker", address=WORKER_IP, ray_node_id=ray.ray_node_id(),
                                      ray_version="2.60.0"))
    await coordinator.report(WORKER_ID, "SERVING", None)

    async def leave_when_told() -> None:  # as a worker does when the head drains the cluster
        info = await coordinator.info()
        while info.desired.value != "drain":
            info = await coordinator.wait_for_change(info.version, 60)
        await ray.stop_node()

    asyncio.get_running_loop().create_task(leave_when_told())
    return coordinator


def sample(text: bytes, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    return 0.0


async def test_a_node_death_is_recorded_as_node_lost_timed_from_its_first_sign(tmp_path):
    """The gateway sees the replica fail first (its port refuses), seconds before Ray
    lists the node dead: the trigger still names the node's loss, once, and detection
    is timed from the replica's last good answer."""
    world = World()
    head = start_head(tmp_path, world)
    await until(lambda: head.node.coordinator is not None, what="coordinator")
    await join_fake_worker(world)
    await head.reach(State.SERVING)
    gateway = head.node.gateway
    replica = gateway.pool.replicas[f"replica-{WORKER_ID}"]
    replica.last_ok = asyncio.get_running_loop().time() - 2.0  # its last good answer
    world.kill(WORKER_IP)  # every process of the node: its raylet refuses, Ray still lists it alive
    gateway._mark(replica, "health check: ClientConnectorError: connection refused")
    await head.reach(State.DEGRADED, timeout=2.0)
    move = head.loop.last_moved
    assert move.trigger.value == "node_lost", move
    assert move.reason.startswith(f"{WORKER_ID}'s raylet does not answer") and "first sign: replica-" in move.reason
    next(n for n in world.nodes.values() if n.address == WORKER_IP and not n.raylet_answers).alive = False
    await until(lambda: head.node.board.get("alive_nodes") == 1, what="Ray's count")
    await asyncio.sleep(0.2)  # more monitor rounds: no second transition
    text = await head.node.metrics_text()
    assert sample(text, "llmctl_transitions_total", role="head", **{"from": "SERVING", "to": "DEGRADED"},
                  trigger="node_lost") == 1
    assert sample(text, "llmctl_transitions_total", role="head", **{"from": "SERVING", "to": "DEGRADED"},
                  trigger="engine_failed") == 0
    assert sample(text, "llmctl_detection_seconds_count") == 1
    assert 2.0 <= sample(text, "llmctl_detection_seconds_sum") < 3.0
    member = (await head.node.coordinator.snapshot()).member(WORKER_ID)
    assert (member.state, member.alive) == (MemberState.LOST, False)
    await head.stop()


async def test_a_stalled_replica_degrades_the_cluster_until_the_gateway_clears_it(tmp_path):
    """The gateway holds a replica as stalled (its streams make no token progress, its
    engine's counters confirm it): the reconciler publishes it, the head goes DEGRADED
    with `engine_stalled` and the gateway's reason, and recovers once it is cleared."""
    world = World()
    head = start_head(tmp_path, world)
    await until(lambda: head.node.coordinator is not None, what="coordinator")
    await join_fake_worker(world)
    await head.reach(State.SERVING)
    why = f"replica-{WORKER_ID} stalled: no token for 2.1s on 1 stream; its engine's counters did not move"
    head.node.gateway.stalled = lambda: why
    head.node.engines.wake()
    await head.reach(State.DEGRADED, timeout=2.0)
    assert (head.loop.last_moved.trigger.value, head.loop.last_moved.reason) == ("engine_stalled", why)
    assert head.node.board.get("engine_stalled") == why
    head.node.gateway.stalled = lambda: None
    head.node.engines.wake()
    await head.reach(State.SERVING, timeout=2.0)
    await head.stop()


async def test_a_draining_workers_replica_is_retired_when_its_report_lands(tmp_path):
    """Not at the next engine poll (--health-interval later, long enough for a client
    to land on the leaving replica): the coordinator's change wakes the reconciler."""
    world = World()
    head = start_head(tmp_path, world)
    await until(lambda: head.node.coordinator is not None, what="coordinator")
    worker = await join_fake_worker(world)
    await head.reach(State.SERVING, timeout=10)
    head.node.engines.health_interval = 30.0  # no engine poll comes before the report's wake
    await asyncio.sleep(0.3)  # the round under way ends
    replica = head.node.gateway.pool.replicas[f"replica-{WORKER_ID}"]
    assert not replica.retiring
    await worker.report(WORKER_ID, "DRAINING", {"from": "SERVING", "to": "DRAINING", "trigger": "drain",
                                                 "reason": "SIGTERM received"})
    await until(lambda: replica.retiring, timeout=0.5, what="the replica retired")
    assert all(head.node.gateway.pool.pick() is not replica for _ in range(20))
    # Nothing in flight on it: stopped and the worker released at once.
    await until(lambda: WORKER_ID in (world.actors[ACTOR_NAME][0]._state.released), timeout=1.0,
                what="the worker released")
    await head.stop()


class FakePopen:
    pid = 99999

    def wait(self, timeout=None):
        return 0


async def test_a_coordinator_pause_does_not_stop_the_start_of_local_workers(tmp_path):
    world = World()
    ray = FakeRay(world, "127.0.0.2")
    await ray.start(["--head"], 1.0)
    handle = ray.create_actor(Coordinator, 1, name=ACTOR_NAME, node_id=ray.ray_node_id(), max_concurrency=10)
    coordinator = CoordinatorClient(ray, handle, 1, call_timeout=0.1)
    cfg = config(tmp_path, "head", "--local-workers", "1", "--expected-workers", "1")
    started = []

    def spawn(argv, **kwargs):
        started.append(argv)
        world.actors[ACTOR_NAME][0]._state.register(Member(WORKER_ID, "worker", address=WORKER_IP, pid=1), 1)
        return FakePopen()

    local = LocalWorkers(cfg, 10**8, spawn=spawn)
    world.paused = True
    task = asyncio.get_running_loop().create_task(local.start_all(coordinator, join_timeout=3.0))
    await asyncio.sleep(1.2)  # the coordinator answers nothing for a while
    assert not task.done() and not started
    world.paused = False
    await asyncio.wait_for(task, 3.0)
    assert len(started) == 1 and WORKER_IP in started[0]
    # A coordinator that stays silent past the bound is a clear, fatal error.
    world.paused = True
    local2 = LocalWorkers(cfg, 10**8, spawn=spawn)
    with pytest.raises(FatalError, match="the coordinator did not answer for 0.3s"):
        await local2.start_all(coordinator, join_timeout=0.3)


async def test_a_worker_started_before_its_head_joins_once_the_head_is_up(tmp_path):
    world = World()
    cfg = config(tmp_path, "worker", "--join-attempts", "20")
    worker = Running(WorkerNode(cfg, Board(clock=asyncio.get_running_loop().time), FakeRay(world, WORKER_IP)),
                     Role.WORKER, cfg)
    with capture_logs() as logs:
        await until(lambda: sum(e["event"] == "join_attempt_failed" for e in logs) >= 2, what="two failed joins")
        assert worker.state is State.JOINING
        head = start_head(tmp_path, world)  # the head, 2 attempts late
        await worker.reach(State.WAITING_FOR_WORKERS)
        await head.reach(State.SERVING, timeout=10)
        await worker.reach(State.SERVING)
    member = (await head.node.coordinator.snapshot()).member(WORKER_ID)
    assert member.alive and member.join_attempt >= 3
    await worker.stop()
    await head.stop()


async def test_a_hung_worker_is_fenced_when_it_comes_back_and_rejoins(tmp_path):
    """While it hung, Ray declared its node dead and the head marked it LOST: its late
    heartbeat hears so, and it rejoins instead of serving as a ghost."""
    world = World()
    head = start_head(tmp_path, world, "--engine", "none")
    cfg = config(tmp_path, "worker", "--engine", "none")
    worker = Running(WorkerNode(cfg, Board(clock=asyncio.get_running_loop().time), FakeRay(world, WORKER_IP)),
                     Role.WORKER, cfg)
    await head.reach(State.SERVING, timeout=10)
    await worker.reach(State.SERVING)
    first_node = worker.node.ray_node_id
    world.nodes[first_node].alive = False  # the hang outlasted Ray's health checks
    await head.reach(State.DEGRADED)
    await until(lambda: any(m.trigger.value == "rejoin" for m in worker.moves), what="the worker fenced, rejoining")
    await worker.reach(State.SERVING, timeout=10)
    await head.reach(State.SERVING, timeout=10)
    moves = [(m.source.value, m.dest.value, m.trigger.value) for m in worker.moves]
    assert ("SERVING", "DEGRADED", "cluster_degraded") in moves and ("DEGRADED", "JOINING", "rejoin") in moves
    member = (await head.node.coordinator.snapshot()).member(WORKER_ID)
    assert member.alive and member.ray_node_id != first_node
    await worker.stop()
    await head.stop()


async def test_each_part_registers_its_stop_once_however_many_ticks(tmp_path):
    """Shutdown undoes start-up from the cleanup stack: a part that registered its
    stop on every tick would be stopped (and wait out its bound) again and again."""
    world = World()
    head = start_head(tmp_path, world, "--local-workers", "1")

    def spawn(argv, **kwargs):
        asyncio.get_running_loop().create_task(join_fake_worker(world))
        return FakePopen()

    head.node.local.spawn = spawn
    await head.reach(State.SERVING, timeout=10)
    steps = len(head.node.cleanup._exit_callbacks)
    await asyncio.sleep(0.3)  # about 15 more ticks
    assert len(head.node.cleanup._exit_callbacks) == steps == 5  # ray, workers, monitors, engines, gateway drain
    await head.stop()


async def test_a_gateway_signal_is_heard_while_a_poll_waits_on_a_hung_node(tmp_path):
    """A poll of a replica on a hung node answers only at its timeout (5 s): the
    gateway's first sign must not wait for it."""
    world = World()
    head = start_head(tmp_path, world)
    await until(lambda: head.node.coordinator is not None, what="coordinator")
    await join_fake_worker(world)
    await head.reach(State.SERVING, timeout=10)
    node = next(n for n in world.nodes.values() if n.address == WORKER_IP)
    node.hung = True  # frozen first (SIGSTOP) ...
    await asyncio.sleep(0.4)  # ... so a poll is under way, stuck on it
    node.raylet_answers = False  # ... then killed
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    gateway = head.node.gateway
    gateway._mark(gateway.pool.replicas[f"replica-{WORKER_ID}"], "health check: ClientConnectorError: refused")
    await head.reach(State.DEGRADED, timeout=2.0)
    assert loop.time() - t0 < 1.0 and head.loop.last_moved.trigger.value == "node_lost"
    node.hung = False
    await head.stop()


async def test_a_silent_coordinator_at_shutdown_still_stops_the_local_workers(tmp_path):
    world = World()
    head = start_head(tmp_path, world, "--local-workers", "1")
    stopped = []

    def spawn(argv, **kwargs):
        asyncio.get_running_loop().create_task(join_fake_worker(world))
        return FakePopen()

    async def stop(members, grace):
        stopped.append([m.node_id for m in members])
        return set()

    head.node.local.spawn, head.node.local.stop = spawn, stop
    await head.reach(State.SERVING, timeout=10)
    await head.node.status()  # a snapshot read while the coordinator answered
    head.node.coordinator.call_timeout = 0.1
    world.paused = True
    await head.stop()
    assert stopped and WORKER_ID in stopped[0]  # stopped, with the members last seen


async def test_a_transition_whose_report_fails_is_reported_once_the_coordinator_answers(tmp_path):
    world = World()
    head = start_head(tmp_path, world, "--engine", "none")
    await until(lambda: head.node.coordinator is not None, what="coordinator")
    await join_fake_worker(world)
    await head.reach(State.SERVING, timeout=10)
    head.node.coordinator.call_timeout = 0.1
    world.paused = True
    next(n for n in world.nodes.values() if n.address == WORKER_IP).alive = False
    head.node.board.set(alive_nodes=1)  # what the monitor would write, had the coordinator answered
    await head.reach(State.DEGRADED)
    await asyncio.sleep(0.5)  # its report fails, and is tried again
    world.paused = False
    await until(lambda: any(t["to"] == "DEGRADED" for t in world.actors[ACTOR_NAME][0]._state.history),
                timeout=8.0, what="the DEGRADED transition in the coordinator's history")
    await head.stop()
