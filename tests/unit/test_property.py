"""Random event sequences never leave the table, and a drain always ends in STOPPED."""

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.lifecycle.loop import Board, NodeLoop
from states import Limits, Role, State, next_state

EVENTS = st.one_of(
    st.fixed_dictionaries({"head_up": st.booleans()}),
    st.fixed_dictionaries({"joined": st.booleans(), "my_epoch": st.integers(1, 3)}),
    st.fixed_dictionaries({"alive_nodes": st.integers(0, 4), "registered_workers": st.integers(0, 3)}),
    st.fixed_dictionaries({"cluster_state": st.sampled_from([None, *State])}),
    st.fixed_dictionaries({"cluster_epoch": st.integers(1, 3)}),
    st.fixed_dictionaries({"head_reachable": st.booleans()}),
    st.fixed_dictionaries({"engine_failure": st.sampled_from([None, "engine exited 1"])}),
    st.fixed_dictionaries({"engine_stalled": st.sampled_from([None, "replica-b stalled"])}),
    st.sampled_from(["health_fail", "health_ok", "advance"]),
)


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


class NullEffects:
    async def ensure(self, state, obs):
        pass

    def on_moved(self, moved, record):
        pass

    def epoch(self):
        return 1


def apply(board: Board, clock: Clock, event) -> None:
    if event == "health_fail":
        board.health("gcs", "timed out")
    elif event == "health_ok":
        board.health("gcs", None)
    elif event == "advance":
        clock.now += 30
    else:
        board.set(**event)


async def play(role: Role, events: list) -> None:
    clock, board = Clock(), Board()
    loop = NodeLoop(role, Limits(expected_nodes=3, wait_timeout=100, degraded_timeout=200),
                    board, NullEffects(), clock=clock)
    seen = []
    loop.machine._on_moved = lambda m: seen.append(m)
    for event in events:
        apply(board, clock, event)
        await loop.tick()
        assert loop.state in State
    for m in seen:  # every move the machine made is in the table
        assert next_state(role, m.source, m.trigger) is m.dest
    board.set(drain_requested="test drain")
    for _ in range(3):
        await loop.tick()
    board.set(drained=True)
    for _ in range(3):
        await loop.tick()
    assert loop.state is State.STOPPED


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(list(Role)), st.lists(EVENTS, max_size=40))
def test_random_sequences_stay_in_table_and_drain_to_stopped(role, events):
    asyncio.run(play(role, events))
