"""Engine bad input on a real one-node cluster (the head alone): each ends in a
clear error, STOPPED, exit 1, and nothing of the test left running."""

from __future__ import annotations

import re
import socket

from controller import testing as tk

from .conftest import HEAD_IP, Cluster, head_args


def start_head(tmp_path, *extra: str) -> Cluster:
    c = Cluster(tmp=tmp_path, ray_port=tk.free_port(), control_port=tk.free_port(), head=None, args=[])  # type: ignore[arg-type]
    c.head = c.start(head_args(c.ray_port, c.control_port, tmp_path / "state", "--node-ip-address", HEAD_IP,
                               "--engine", "vllm", *extra), "head", c.control_port)
    return c


def stopped_with(c: Cluster, timeout: float = 240) -> str:
    """The head's last line, once it stopped with exit 1 after a fatal error while waiting."""
    assert c.head.wait(timeout) == 1
    c.pgids |= {e["pgid"] for e in c.head.events() if e.get("event") == "ray_started"}
    last = c.head.log_path.read_text().strip().splitlines()[-1]
    moves = [(t["from"], t["to"], t["trigger"]) for t in tk.transitions(c.head.events())]
    assert moves[-1] == ("WAITING_FOR_WORKERS", "STOPPED", "fatal"), moves
    return last


def assert_nothing_left(c: Cluster) -> None:
    left = c.cleanup()
    assert not left, f"processes left: {sorted(left)}"
    assert c.pgids, "Ray was started and must be gone now"
    # The engine's own traceback is forwarded as engine_output; the controller prints none.
    own = [line for line in c.head.log_path.read_text().splitlines() if '"engine_output"' not in line]
    assert not [line for line in own if "Traceback" in line]


def test_a_model_vllm_cannot_load_stops_the_cluster_with_the_engines_error(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    c = start_head(tmp_path, "--model", str(broken), "--engine-restarts", "0")
    try:
        last = stopped_with(c)
        assert re.match(r"controller: error: replica-head-127\.0\.0\.2 failed: engine exited with code 1: .+"
                        r" \(gave up after 0 restarts\); the cluster cannot serve$", last), last
        # The engine's own output reached the head's log, with the replica id.
        output = [e for e in c.head.events() if e["event"] == "engine_output"]
        assert output and {e["replica_id"] for e in output} == {"replica-head-127.0.0.2"}
    finally:
        assert_nothing_left(c)


def test_an_engine_port_already_taken_stops_the_cluster_without_retrying(tmp_path):
    with socket.socket() as taken:
        taken.bind((HEAD_IP, 0))
        taken.listen()
        port = taken.getsockname()[1]
        c = start_head(tmp_path, "--engine-port", str(port))
        try:
            last = stopped_with(c)
            assert last == (f"controller: error: replica-head-127.0.0.2 failed: engine port {HEAD_IP}:{port} "
                            "is already taken; the cluster cannot serve")
            assert not [e for e in c.head.events() if e["event"] == "engine_restarting"]
        finally:
            assert_nothing_left(c)


def test_sharded_mode_needs_the_gpus_its_layout_names(tmp_path):
    c = start_head(tmp_path, "--mode", "sharded", "--tensor-parallel-size", "2")
    try:
        last = stopped_with(c)
        assert last == ("controller: error: sharded mode needs tensor-parallel-size x pipeline-parallel-size "
                        "= 2 x 1 = 2 GPUs; the cluster has 0")
        assert not [e for e in c.head.events() if e["event"] == "sharded_engine_launching"]
    finally:
        assert_nothing_left(c)
