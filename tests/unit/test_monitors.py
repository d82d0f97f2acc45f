"""The monitors on a fake Ray and the real coordinator: what each writes on the board."""

from __future__ import annotations

from controller.cluster.coordinator import ACTOR_NAME, Coordinator, CoordinatorClient
from controller.cluster.monitors import ClusterMonitor, CoordinatorWatch, GcsCliMonitor
from controller.cluster.records import Member, MemberState
from controller.lifecycle.loop import Board
from states import State

from .fakes import FakeClock, FakeRay, World


async def cluster(clock):
    world = World()
    ray = FakeRay(world, "127.0.0.2")
    await ray.start(["--head"], 1.0)
    handle = ray.create_actor(Coordinator, 1, name=ACTOR_NAME, node_id=ray.ray_node_id(), max_concurrency=10)
    coordinator = CoordinatorClient(ray, handle, 1)
    await coordinator.register(Member("head", "head", address="127.0.0.2", ray_node_id=ray.ray_node_id()))
    worker_ray = FakeRay(world, "127.0.0.3")
    await worker_ray.start(["--address", "x"], 1.0)
    await coordinator.register(Member("w", "worker", address="127.0.0.3", ray_node_id=worker_ray.ray_node_id()))
    return world, ray, coordinator, worker_ray


async def test_cluster_monitor_counts_nodes_and_marks_the_dead_lost_from_their_last_heartbeat():
    clock = FakeClock()
    world, ray, coordinator, worker_ray = await cluster(clock)
    board = Board(clock=clock)
    monitor = ClusterMonitor(ray, coordinator, board, clock)
    await monitor.check()
    assert (board.get("alive_nodes"), board.get("registered_workers")) == (2, 1)
    assert board.first_fault() is None
    world.nodes[worker_ray.ray_node_id()].alive = False
    await monitor.check()
    assert (board.get("alive_nodes"), board.get("registered_workers")) == (1, 0)
    member = (await coordinator.snapshot()).member("w")
    assert (member.state, member.alive) == (MemberState.LOST, False)
    # The first sign is the lost node's last heartbeat (its registration here): just now.
    assert clock.now - 1.0 < board.first_fault() <= clock.now


async def test_cluster_monitor_counts_a_coordinator_that_does_not_answer_as_a_failed_check():
    clock = FakeClock()
    world, ray, coordinator, _ = await cluster(clock)
    coordinator.call_timeout = 0.05
    board = Board(clock=clock)
    world.paused = True
    await ClusterMonitor(ray, coordinator, board, clock).check()
    assert board.get("health_failures") == 1 and "coordinator: timed out" in board.get("last_health_error")
    assert board.get("alive_nodes") == 2  # Ray itself answered


async def test_gcs_cli_check_says_reachable_only_when_it_answered_after_the_coordinator_stopped():
    clock = FakeClock()
    world, ray, _, _ = await cluster(clock)
    board = Board(clock=clock)
    cli = GcsCliMonitor(ray, "127.0.0.2:6390", board, clock)
    await cli.check()
    assert board.get("head_reachable") is False  # nothing in doubt: an answer proves nothing new
    board.health("coordinator", "coordinator heartbeat: timed out")
    clock.advance(1.0)
    await cli.check()
    assert board.get("head_reachable") is True
    world.head_port_open = False
    await cli.check()
    assert board.get("head_reachable") is False and "health-check" in board.get("last_health_error")


async def test_coordinator_watch_follows_the_head_and_hears_a_drain_and_a_new_epoch():
    clock = FakeClock()
    world, ray, coordinator, worker_ray = await cluster(clock)
    board = Board(clock=clock)
    mine = CoordinatorClient(worker_ray, await worker_ray.get_actor(ACTOR_NAME, 1.0), 1)
    watch = CoordinatorWatch(mine, board, "w")
    await coordinator.report("head", "SERVING", None)
    await watch.watch(poll_timeout=0.1)
    assert (board.get("cluster_state"), board.get("cluster_epoch")) == (State.SERVING, 1)
    await watch.heartbeat()
    assert board.get("fenced") is False and board.get("health_failures") == 0
    await coordinator.set_desired("drain")
    await watch.watch(poll_timeout=0.1)
    assert board.get("cluster_draining") is True
    mine.epoch = 0  # joined under an epoch the cluster has left
    await watch.heartbeat()
    assert board.get("cluster_epoch") == 1 and board.get("health_failures") == 0
