"""The head's readiness rule for replicas, without Ray."""

from controller.cluster.records import Member, ReplicaState, ReplicaStatus
from controller.engines.replicas import ReplicaSet, choose_nodes


def with_states(states: dict[str, str], ever_ready=()) -> ReplicaSet:
    rs = ReplicaSet(None, model="tiny", served_name="tiny")
    for node_id, state in states.items():
        rs.handles[node_id] = object()
        rs.last[node_id] = ReplicaStatus(replica_id=f"replica-{node_id}", node_id=node_id, url=None,
                                         state=ReplicaState(state),
                                         reason="engine exited with code -9" if state != "READY" else None)
    rs.ever_ready |= set(ever_ready)
    return rs


def test_ready_needs_a_ready_replica_for_every_expected_node():
    assert with_states({"a": "READY", "b": "READY", "c": "READY"}).all_ready(3)
    # A node just joined and has no replica yet: not ready, whatever the others say.
    assert not with_states({"a": "READY", "b": "READY"}).all_ready(3)
    assert not with_states({"a": "READY", "b": "READY", "c": "STARTING"}).all_ready(3)


def test_failure_only_for_replicas_that_served():
    starting = with_states({"a": "READY", "b": "STARTING"}, ever_ready={"a"})
    assert starting.failure() is None  # b never served: it is starting, not failing
    failed = with_states({"a": "READY", "b": "RESTARTING"}, ever_ready={"a", "b"})
    assert failed.failure() == "replica-b is RESTARTING: engine exited with code -9"


def test_limit_counts_wanted_replicas():
    rs = with_states({"a": "READY", "b": "READY"})
    rs.limit = 2
    assert rs.all_ready(3)  # two replicas wanted on a three-node cluster
    assert not with_states({"a": "READY", "b": "READY"}).all_ready(3)


def test_given_up_names_the_failed_replica():
    assert with_states({"a": "READY"}).given_up() is None
    assert with_states({"a": "READY", "b": "FAILED"}).given_up() == "replica-b failed: engine exited with code -9"


def test_choose_nodes_keeps_replicas_then_head_first():
    members = [Member(node_id=n, role=r, address=a) for n, r, a in
               [("w2", "worker", "10.0.0.3"), ("h", "head", "10.0.0.9"), ("w1", "worker", "10.0.0.2")]]
    assert choose_nodes(members, set(), 0) == ["h", "w1", "w2"]
    assert choose_nodes(members, set(), 2) == ["h", "w1"]
    assert choose_nodes(members, {"w2"}, 2) == ["w2", "h"]  # a running replica is not moved


def test_engines_of_a_one_machine_cluster_get_their_own_cores():
    from controller.engines.replicas import one_machine_cpu_binding

    bind = one_machine_cpu_binding(["127.0.0.2", "127.0.0.3", "127.0.0.4"], [0, 1])
    assert [bind[a]["VLLM_CPU_OMP_THREADS_BIND"] for a in ("127.0.0.2", "127.0.0.3", "127.0.0.4")] == ["0", "1", "0"]
    assert one_machine_cpu_binding(["10.0.0.1"], [0, 1, 2, 3]) == {}  # one node: vLLM binds as it likes
