"""The coordinator's rules, without Ray: fencing, versions, membership, history."""

import asyncio

import pytest

from controller.cluster.coordinator import (
    HISTORY_SIZE,
    Coordinator,
    CoordinatorState,
    Refused,
    StaleEpoch,
)
from controller.cluster.records import Member


def member(node_id="worker-a", role="worker", address=None, ray_version="2.60.0"):
    return Member(node_id=node_id, role=role, ray_node_id="r-" + node_id,
                  address=address or f"10.0.0.{abs(hash(node_id)) % 250 + 1}",
                  pid=123, ray_pgid=124, ray_version=ray_version, python_version="3.11.7")


def test_two_live_nodes_with_one_address_are_refused():
    c = CoordinatorState(epoch=1)
    c.register(member("head", "head", address="10.0.0.1"), epoch=1)
    c.register(member("a", address="10.0.0.2"), epoch=1)
    with pytest.raises(Refused, match="node b reports address 10.0.0.2, which node a already has"):
        c.register(member("b", address="10.0.0.2"), epoch=1)
    assert "b" not in {m.node_id for m in c.snapshot().members}
    c.register(member("a", address="10.0.0.2"), epoch=1)  # the same node again: a rejoin
    c.mark_lost(1, ["a"])
    c.register(member("b", address="10.0.0.2"), epoch=1)  # the address of a lost node is free


def test_a_node_with_another_ray_version_is_refused():
    c = CoordinatorState(epoch=1)
    c.register(member("head", "head"), epoch=1)
    with pytest.raises(Refused, match="node a runs Ray 2.59.0 but the head runs 2.60.0"):
        c.register(member("a", ray_version="2.59.0"), epoch=1)


def test_refusal_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(Refused("why")))
    assert isinstance(err, Refused) and str(err) == "why"


def test_register_requires_current_epoch():
    c = CoordinatorState(epoch=3)
    with pytest.raises(StaleEpoch) as err:
        c.register(member(), epoch=2)
    assert err.value.current == 3 and "stale epoch 2" in str(err.value)
    info = c.register(member(), epoch=3)
    assert info.epoch == 3 and info.version == 1


@pytest.mark.parametrize("call", [
    lambda c: c.report("worker-a", 1, "SERVING"),
    lambda c: c.heartbeat("worker-a", 1),
    lambda c: c.set_cluster(1, state="SERVING"),
    lambda c: c.mark_lost(1, ["worker-a"]),
    lambda c: c.set_desired(1, "drain"),
    lambda c: c.set_replicas(1, []),
    lambda c: c.release(1, ["worker-a"]),
])
def test_every_write_is_fenced(call):
    c = CoordinatorState(epoch=2)
    c.register(member(), epoch=2)
    with pytest.raises(StaleEpoch):
        call(c)


def test_report_updates_member_and_history_bounded():
    c = CoordinatorState(epoch=1)
    c.register(member(), epoch=1)
    for i in range(HISTORY_SIZE + 10):
        c.report("worker-a", 1, "SERVING" if i % 2 else "DEGRADED",
                 {"from": "A", "to": "B", "trigger": "t", "reason": str(i)})
    snap = c.snapshot()
    assert len(snap.transitions) == HISTORY_SIZE
    assert snap.transitions[-1]["reason"] == str(HISTORY_SIZE + 9)
    assert snap.members[0].state == "SERVING"


def test_heartbeat_does_not_bump_version():
    c = CoordinatorState(epoch=1)
    c.register(member(), epoch=1)
    v = c.version
    c.heartbeat("worker-a", 1)
    assert c.version == v


def test_a_lost_member_is_told_so_and_a_late_report_does_not_bring_it_back():
    c = CoordinatorState(epoch=1)
    c.register(member("a"), epoch=1)
    assert c.heartbeat("a", 1).member_lost is False
    c.mark_lost(1, ["a"])
    c.report("a", 1, "DEGRADED", {"from": "SERVING", "to": "DEGRADED", "trigger": "cluster_degraded",
                                   "reason": "late"})
    (a,) = c.snapshot().members
    assert (a.state, a.alive) == ("LOST", False)  # one view: Ray's
    assert c.heartbeat("a", 1).member_lost is True
    c.register(member("a"), epoch=1)  # it rejoined
    assert c.heartbeat("a", 1).member_lost is False


def test_mark_lost_distinguishes_drained_from_lost():
    c = CoordinatorState(epoch=1)
    c.register(member("a"), epoch=1)
    c.register(member("b"), epoch=1)
    c.report("b", 1, "DRAINING")
    c.mark_lost(1, ["a", "b"])
    states = {m.node_id: (m.state, m.alive) for m in c.snapshot().members}
    assert states == {"a": ("LOST", False), "b": ("STOPPED", False)}


def test_desired_state_validated():
    c = CoordinatorState(epoch=1)
    with pytest.raises(ValueError):
        c.set_desired(1, "explode")


async def test_wait_for_change_long_polls():
    actor = Coordinator(epoch=1)
    snap = await actor.wait_for_change(0, timeout=0.05)  # nothing changed: returns at timeout
    assert snap.version == 0
    waiter = asyncio.create_task(actor.wait_for_change(0, timeout=5))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await actor.set_desired(1, "drain")
    snap = await asyncio.wait_for(waiter, 1)
    assert snap.version == 1 and snap.desired == "drain"


def test_stale_epoch_survives_pickling():
    import pickle

    err = pickle.loads(pickle.dumps(StaleEpoch(1, 2)))
    assert (err.given, err.current) == (1, 2)


def test_released_workers_are_in_the_info_until_they_register_again():
    c = CoordinatorState(epoch=1)
    c.register(member(), epoch=1)
    before = c.version
    info = c.release(1, ["worker-a"])
    assert list(info.released) == ["worker-a"] and c.version == before + 1
    assert c.release(1, ["worker-a"]).version == before + 1  # nothing new: watchers are not woken
    c.register(member(), epoch=1)
    assert list(c.info().released) == []


def test_transitions_are_counted_by_role_from_to_trigger():
    c = CoordinatorState(epoch=1)
    c.register(member(), epoch=1)
    for _ in range(2):
        c.report("worker-a", 1, "DEGRADED", {"from": "SERVING", "to": "DEGRADED", "trigger": "head_lost",
                                              "reason": "x"})
    c.report("ghost", 1, "SERVING", {"from": "INIT", "to": "JOINING", "trigger": "start", "reason": "x"})
    assert c.snapshot().transition_counts == {"worker|SERVING|DEGRADED|head_lost": 2,
                                                 "unknown|INIT|JOINING|start": 1}
