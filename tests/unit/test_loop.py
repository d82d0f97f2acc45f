"""The reconcile loop with a fake clock and fake effects: scripts of observations."""

import pytest
from structlog.testing import capture_logs

from controller.lifecycle.loop import Board, NodeLoop
from states import Limits, Role, State

S = State


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeEffects:
    """Records what the loop asked for; the test plays the world by writing the board."""

    def __init__(self) -> None:
        self.ensured: list[State] = []
        self.moves: list[dict] = []

    async def ensure(self, state, obs):
        self.ensured.append(state)

    def on_moved(self, moved, record):
        self.moves.append(record)

    def epoch(self):
        return 7


def make(role=Role.HEAD, **limits):
    limits.setdefault("expected_nodes", 3)
    limits.setdefault("wait_timeout", 60)
    clock, board, effects = FakeClock(), Board(), FakeEffects()
    loop = NodeLoop(role, Limits(**limits), board, effects, clock=clock, tick_interval=1.0)
    return loop, board, clock, effects


async def ticks(loop, n=1):
    for _ in range(n):
        await loop.tick()


async def bring_head_to_serving(loop, board):
    await ticks(loop)  # INIT -> JOINING
    board.set(head_up=True)
    await ticks(loop)
    board.set(alive_nodes=3, registered_workers=2)
    await ticks(loop)
    assert loop.state is S.SERVING


async def test_head_happy_path_logs_each_transition():
    loop, board, clock, effects = make()
    with capture_logs() as logs:
        await bring_head_to_serving(loop, board)
    events = [e for e in logs if e["event"] == "transition"]
    assert [(e["from"], e["to"], e["trigger"]) for e in events] == [
        ("INIT", "JOINING", "start"),
        ("JOINING", "WAITING_FOR_WORKERS", "head_up"),
        ("WAITING_FOR_WORKERS", "SERVING", "cluster_ready"),
    ]
    for e in events:
        assert e["epoch"] == 7 and isinstance(e["in_state_s"], float) and e["reason"]
    assert effects.moves[-1]["to"] == "SERVING"


async def test_join_timeout_is_fatal_with_reason():
    loop, board, clock, effects = make(wait_timeout=60)
    await ticks(loop)
    board.set(head_up=True)
    await ticks(loop)
    board.set(alive_nodes=2, registered_workers=1)
    clock.advance(59)
    await ticks(loop)
    assert loop.state is S.WAITING_FOR_WORKERS
    clock.advance(1)
    with capture_logs() as logs:
        await ticks(loop)
    assert loop.state is S.STOPPED
    assert "did not join within 60s" in loop.fatal_reason
    assert logs[-1]["trigger"] == "fatal" and logs[-1]["in_state_s"] == 60.0


async def test_health_threshold_counts_consecutive_failures_and_resets():
    loop, board, clock, effects = make(failure_threshold=3)
    await bring_head_to_serving(loop, board)
    board.health("gcs", "timed out")
    board.health("gcs", "timed out")
    await ticks(loop)
    assert loop.state is S.SERVING  # two failures: below the threshold
    board.health("gcs", None)       # a success resets the count
    board.health("gcs", "timed out")
    board.health("gcs", "timed out")
    await ticks(loop)
    assert loop.state is S.SERVING
    board.health("gcs", "timed out")
    await ticks(loop)
    assert loop.state is S.DEGRADED
    assert "3 consecutive health checks failed: timed out" in loop.last_moved.reason


async def test_one_healthy_signal_does_not_hide_another_failing():
    loop, board, clock, effects = make(failure_threshold=2)
    await bring_head_to_serving(loop, board)
    for _ in range(2):
        board.health("gcs_cli", "did not answer")
        board.health("gcs", None)
    await ticks(loop)
    assert loop.state is S.DEGRADED


async def test_node_lost_then_recovered():
    loop, board, clock, effects = make()
    await bring_head_to_serving(loop, board)
    board.set(alive_nodes=2, registered_workers=1)
    await ticks(loop)
    assert loop.state is S.DEGRADED and loop.last_moved.trigger.value == "node_lost"
    board.set(alive_nodes=3, registered_workers=2)
    await ticks(loop)
    assert loop.state is S.SERVING and loop.last_moved.trigger.value == "recovered"


async def reach(loop, board, clock, target: State):
    """Drive a fresh head to `target` through the table's ordinary path."""
    steps = {
        S.INIT: {},
        S.JOINING: {},
        S.WAITING_FOR_WORKERS: {"head_up": True},
        S.SERVING: {"head_up": True, "alive_nodes": 3, "registered_workers": 2},
        S.DEGRADED: {"head_up": True, "alive_nodes": 2, "registered_workers": 1},
    }
    if target is S.INIT:
        return
    await ticks(loop)  # -> JOINING
    if target is S.DEGRADED:
        board.set(**steps[S.SERVING])
        await ticks(loop, 2)
    board.set(**steps[target])
    for _ in range(3):  # one trigger per tick
        if loop.state is target:
            break
        await ticks(loop)
    assert loop.state is target


@pytest.mark.parametrize("start", [S.INIT, S.JOINING, S.WAITING_FOR_WORKERS, S.SERVING, S.DEGRADED])
async def test_drain_from_every_state_ends_stopped(start):
    loop, board, clock, effects = make()
    await reach(loop, board, clock, start)
    board.set(drain_requested="SIGTERM received")
    await ticks(loop)
    assert loop.state is S.DRAINING
    assert effects.ensured[-1] is S.DRAINING  # the drain work is asked for
    await ticks(loop, 3)
    assert loop.state is S.DRAINING  # waits for the drain to finish
    board.set(drained=True)
    await ticks(loop)
    assert loop.state is S.STOPPED
    assert loop.fatal_reason is None


async def test_run_returns_when_stopped_and_wakes_on_board_change():
    import asyncio

    loop, board, clock, effects = make(role=Role.WORKER)
    loop.tick_interval = 3600  # only a board change can wake it

    async def world():
        await asyncio.sleep(0.01)
        board.set(fatal="could not join the head")

    asyncio.get_running_loop().create_task(world())
    result = await asyncio.wait_for(loop.run(), 5)
    assert result.state is S.STOPPED and result.fatal_reason == "could not join the head"


async def test_failing_ensure_does_not_kill_the_loop():
    loop, board, clock, effects = make()

    async def broken(state, obs):
        raise RuntimeError("adapter exploded")

    effects.ensure = broken
    with capture_logs() as logs:
        await ticks(loop, 2)
    assert loop.state is S.JOINING
    assert any(e["event"] == "ensure_failed" for e in logs)


async def test_a_failing_monitor_backs_off_instead_of_spinning():
    import asyncio

    from controller.lifecycle.tasks import every

    calls = []

    async def broken():
        calls.append(1)
        raise RuntimeError("GCS unreachable")

    task = asyncio.get_running_loop().create_task(every(0.0, broken, "test", error_interval=0.1))
    await asyncio.sleep(0.35)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert 2 <= len(calls) <= 5  # an interval of 0 would otherwise have called it thousands of times


async def test_cancel_cancels_even_with_no_time_left_and_again_when_a_cancel_is_swallowed():
    import asyncio

    from controller.lifecycle.tasks import TaskSet

    tasks = TaskSet(lambda name, exc: None)
    first = tasks.ensure("a", lambda: asyncio.sleep(60))
    await asyncio.sleep(0)
    await tasks.cancel("a", timeout=0)
    await asyncio.sleep(0)
    assert first.cancelled()
    swallowed = []

    async def stubborn():  # as asyncio.wait_for (3.11) does when its awaitable completes as the cancel comes
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            swallowed.append(1)
        await asyncio.sleep(60)

    second = tasks.ensure("b", stubborn)
    await asyncio.sleep(0)
    await tasks.cancel("b", timeout=2.0)
    assert second.cancelled() and swallowed == [1]


async def test_drain_signals_keep_nohup_and_are_ignored_once_the_node_stops():
    import asyncio
    import signal

    from controller.surface.cli import DRAIN_SIGNALS, drain_on_signals

    saved = {sig: signal.getsignal(sig) for sig in DRAIN_SIGNALS}
    try:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # started under nohup
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        drains = []
        loop = asyncio.get_running_loop()
        with drain_on_signals(loop, drains.append):
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # the operator's choice stands
            signal.raise_signal(signal.SIGTERM)
            await asyncio.sleep(0.05)
            assert drains == ["SIGTERM received"]
        assert all(signal.getsignal(sig) is signal.SIG_IGN for sig in DRAIN_SIGNALS)  # stopping: no death by signal
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
