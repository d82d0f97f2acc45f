"""The transition tables, pair by pair, against DESIGN.md section 3 written out here."""

import pytest

from states import Lifecycle, MachineError, Role, State, Trigger, next_state

S, T = State, Trigger
NOT_STOPPED = [s for s in State if s is not S.STOPPED]
DRAINABLE = [s for s in State if s not in (S.DRAINING, S.STOPPED)]

# An independent copy of the design's tables: if code and design drift, these fail.
EXPECTED = {
    Role.HEAD: {
        (S.INIT, T.START): S.JOINING,
        (S.JOINING, T.HEAD_UP): S.WAITING_FOR_WORKERS,
        (S.WAITING_FOR_WORKERS, T.CLUSTER_READY): S.SERVING,
        (S.SERVING, T.NODE_LOST): S.DEGRADED,
        (S.SERVING, T.ENGINE_FAILED): S.DEGRADED,
        (S.SERVING, T.ENGINE_STALLED): S.DEGRADED,
        (S.SERVING, T.HEALTH_FAILED): S.DEGRADED,
        (S.DEGRADED, T.RECOVERED): S.SERVING,
        (S.DRAINING, T.DRAINED): S.STOPPED,
        **{(s, T.DRAIN): S.DRAINING for s in DRAINABLE},
        **{(s, T.FATAL): S.STOPPED for s in NOT_STOPPED},
    },
    Role.WORKER: {
        (S.INIT, T.START): S.JOINING,
        (S.JOINING, T.JOINED): S.WAITING_FOR_WORKERS,
        (S.WAITING_FOR_WORKERS, T.CLUSTER_SERVING): S.SERVING,
        (S.SERVING, T.HEAD_LOST): S.DEGRADED,
        (S.SERVING, T.CLUSTER_DEGRADED): S.DEGRADED,
        (S.DEGRADED, T.RECOVERED): S.SERVING,
        (S.DEGRADED, T.REJOIN): S.JOINING,
        (S.DRAINING, T.DRAINED): S.STOPPED,
        **{(s, T.DRAIN): S.DRAINING for s in DRAINABLE},
        **{(s, T.FATAL): S.STOPPED for s in NOT_STOPPED},
    },
}

ALL_PAIRS = [(role, state, trigger) for role in Role for state in State for trigger in Trigger]


def machine_in(role: Role, state: State) -> Lifecycle:
    machine = Lifecycle(role)
    machine.machine.set_state(state)
    return machine


@pytest.mark.parametrize("role,state,trigger", ALL_PAIRS,
                         ids=[f"{r.value}-{s.value}-{t.value}" for r, s, t in ALL_PAIRS])
async def test_every_state_trigger_pair(role, state, trigger):
    expected = EXPECTED[role].get((state, trigger))
    assert next_state(role, state, trigger) == expected
    machine = machine_in(role, state)
    if expected is None:
        with pytest.raises(MachineError):
            await machine.fire(trigger, "test")
        assert machine.state is state
    else:
        assert await machine.fire(trigger, "test") is expected


@pytest.mark.parametrize("role", list(Role))
def test_stopped_is_terminal(role):
    machine = machine_in(role, S.STOPPED)
    assert [t for t in Trigger if machine.allowed(t)] == []


@pytest.mark.parametrize("role", list(Role))
async def test_transition_reports_source_dest_trigger_reason(role):
    moved = []
    machine = Lifecycle(role, on_moved=moved.append)
    await machine.fire(T.START, "configuration valid")
    assert len(moved) == 1
    m = moved[0]
    assert (m.source, m.dest, m.trigger, m.reason) == (S.INIT, S.JOINING, T.START, "configuration valid")


def test_states_are_str_enums_with_design_names():
    assert [s.value for s in State] == [
        "INIT", "JOINING", "WAITING_FOR_WORKERS", "SERVING", "DEGRADED", "DRAINING", "STOPPED"]
    assert isinstance(S.SERVING, str)
