"""Replicated mode on a real three-node cluster: one vLLM CPU engine per node
(tiny model made on the spot), supervised by a replica actor pinned to its node."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest
from openai import OpenAI

from controller import processes
from controller import testing as tk

from .conftest import serving_cluster, stop_cluster

ENGINES_TIMEOUT = 420


@pytest.fixture(scope="module")
def engine_cluster(tmp_path_factory):
    c = serving_cluster(tmp_path_factory.mktemp("engines"), ENGINES_TIMEOUT,
                        extra=("--engine", "vllm", "--wait-timeout", "400", "--probe-interval", "5"))
    yield c
    stop_cluster(c)


def test_every_node_runs_a_replica_that_answers_real_completions(engine_cluster):
    s = engine_cluster.status()
    nodes = {n["node_id"]: n for n in s["nodes"]}
    replicas = s["replicas"]
    assert sorted(r["node_id"] for r in replicas) == sorted(nodes)
    for r in replicas:
        assert r["state"] == "READY" and r["restarts"] == 0
        host = r["url"].split("//")[1].rsplit(":", 1)[0]
        assert host == nodes[r["node_id"]]["address"]  # served on its own node's address
        client = OpenAI(base_url=r["url"] + "/v1", api_key="unused", timeout=60)
        out = client.completions.create(model="tiny", prompt="the cluster", max_tokens=4, temperature=0)
        assert out.usage.completion_tokens == 4 and out.choices[0].text
        chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2, extra_body={"ignore_eos": True})
        assert chat.usage.completion_tokens == 2
    # Each engine's output is in the head's structured log, under its replica id.
    output = [e for e in engine_cluster.head.events() if e["event"] == "engine_output"]
    assert {e["replica_id"] for e in output} == {r["replica_id"] for r in replicas}
    assert all(e["node_id"] == "head-127.0.0.2" and e["line"] for e in output)


@pytest.mark.chaos
def test_killed_engine_degrades_then_restarts_to_serving(engine_cluster, chaos_report):
    s = engine_cluster.status()
    victim = next(r for r in s["replicas"] if r["node_id"].startswith("worker-"))
    engine_pids = processes.tree({victim["pid"]}, {victim["pid"]})
    assert victim["pid"] in engine_pids
    t0 = time.monotonic()
    processes.kill_now(engine_pids)
    degraded = tk.wait_cluster_state(engine_cluster.control_port, "DEGRADED", 60)
    moves = tk.transitions(engine_cluster.head.events(), "head-127.0.0.2")
    assert moves[-1]["trigger"] == "engine_failed"
    # Seen first by the supervisor (the process exited) or by the gateway's watch of
    # the replica (its port refuses or resets the connection).
    reason = moves[-1]["reason"]
    assert reason.startswith(f"{victim['replica_id']} is")
    assert "engine exited with code -9" in reason or "is unhealthy: health check: Client" in reason, reason
    detect_s = time.monotonic() - t0
    back = tk.wait_cluster_state(engine_cluster.control_port, "SERVING", ENGINES_TIMEOUT)
    assert degraded["cluster"]["state"] == "DEGRADED"
    print(f"engine SIGKILL -> SERVING again in {time.monotonic() - t0:.1f}s")
    restarted = next(r for r in back["replicas"] if r["replica_id"] == victim["replica_id"])
    assert restarted["state"] == "READY" and restarted["restarts"] == 1 and restarted["pid"] != victim["pid"]
    others = [r for r in back["replicas"] if r["replica_id"] != victim["replica_id"]]
    assert all(r["restarts"] == 0 for r in others)
    out = OpenAI(base_url=restarted["url"] + "/v1", api_key="unused", timeout=60).completions.create(
        model="tiny", prompt="again", max_tokens=2, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 2
    assert tk.transitions(engine_cluster.head.events(), "head-127.0.0.2")[-1]["trigger"] == "recovered"
    chaos_report(fault="engine process crash (SIGKILL)", detect_s=detect_s, recover_s=time.monotonic() - t0)


@pytest.mark.chaos
def test_engine_alive_but_not_generating_is_caught_by_the_probe(engine_cluster, chaos_report):
    c = engine_cluster
    s = c.status()
    victim = next(r for r in s["replicas"] if r["node_id"] == "worker-127.0.0.4")
    core = tk.engine_core_pid(victim["pid"])
    t0 = time.monotonic()
    os.kill(core, signal.SIGSTOP)  # the API server still answers /health; no token comes out
    try:
        with urllib.request.urlopen(victim["url"] + "/health", timeout=5) as resp:
            assert resp.status == 200
        degraded = tk.wait_cluster_state(c.control_port, "DEGRADED", 90)
        detect_s = time.monotonic() - t0
        move = tk.transitions(c.head.events(), "head-127.0.0.2")[-1]
        assert move["trigger"] == "engine_failed" and move["reason"].startswith(f"{victim['replica_id']} is")
        assert degraded["cluster"]["state"] == "DEGRADED"
        # The supervisor's own word: the probe caught it (the DEGRADED reason may be the
        # gateway's, which sees the port close as soon as the supervisor stops the engine).
        restarting = tk.wait_for(lambda: [r for r in c.status()["replicas"]
                                          if r["replica_id"] == victim["replica_id"] and r["state"] == "RESTARTING"],
                                 60, 0.2, what="the replica RESTARTING")[0]
        assert restarting["reason"].startswith("generation probe failed 2 times in a row: generation probe failed: "
                                               "TimeoutError"), restarting["reason"]
    finally:
        if processes.is_running(core):
            os.kill(core, signal.SIGCONT)
    back = tk.wait_cluster_state(c.control_port, "SERVING", ENGINES_TIMEOUT)
    assert not processes.is_running(core)  # the hung engine was stopped, not left behind
    restarted = next(r for r in back["replicas"] if r["replica_id"] == victim["replica_id"])
    assert restarted["state"] == "READY" and restarted["restarts"] == 1
    chaos_report(fault="engine hung (EngineCore SIGSTOP): the generation probe", detect_s=detect_s,
                 recover_s=time.monotonic() - t0)


@pytest.mark.chaos
def test_lost_node_takes_its_replica_and_a_new_worker_gets_one(engine_cluster, chaos_report):
    c = engine_cluster
    s = c.record()
    t0 = time.monotonic()
    victim = next(n for n in s["nodes"] if n["address"] == "127.0.0.3")
    victim_replica = next(r for r in s["replicas"] if r["node_id"] == victim["node_id"])
    killed = tk.kill_node(victim, s["nodes"])
    assert victim_replica["pid"] in killed  # the engine went down with its node
    tk.wait_cluster_state(c.control_port, "DEGRADED", 60)
    detect_s = time.monotonic() - t0

    def replica_dropped():
        st = c.status()
        return st if all(r["node_id"] != victim["node_id"] for r in st["replicas"]) else None

    degraded = tk.wait_for(replica_dropped, 60, what="the lost node's replica dropped")
    assert degraded["cluster"]["state"] == "DEGRADED"
    assert {r["state"] for r in degraded["replicas"]} == {"READY"}  # the others keep serving

    joined = time.monotonic()
    c.start(c.worker_args("127.0.0.5", "--join-delay", "2"), "worker-127.0.0.5")
    back = tk.wait_cluster_state(c.control_port, "SERVING", ENGINES_TIMEOUT)
    chaos_report(fault="worker node SIGKILL (replicated engines), then a new worker", detect_s=detect_s,
                 recover_s=time.monotonic() - joined)
    c.record()
    fresh = next(r for r in back["replicas"] if r["node_id"] == "worker-127.0.0.5")
    assert fresh["state"] == "READY" and fresh["url"].startswith("http://127.0.0.5:")
    assert len(back["replicas"]) == 3
    out = OpenAI(base_url=fresh["url"] + "/v1", api_key="unused", timeout=60).completions.create(
        model="tiny", prompt="new node", max_tokens=2, extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 2


@pytest.mark.chaos
def test_sigterm_to_a_worker_drains_its_replica_and_the_rest_serve_on(engine_cluster, chaos_report):
    """The worker leaves alone: requests in flight on its replica finish, no new one
    goes there, the cluster is DEGRADED (not down), and the worker exits 0 with
    nothing left."""
    import asyncio
    import json as jsonlib

    import aiohttp

    c = engine_cluster
    s = c.record()
    leaving = next(p for p in c.started if "worker-127.0.0.5" in p.log_path.name)
    node = next(n for n in s["nodes"] if n["node_id"] == "worker-127.0.0.5")
    gateway = f"http://127.0.0.1:{s['gateway']['port']}"
    body = {"model": "tiny", "prompt": "drain", "max_tokens": 400, "ignore_eos": True, "stream": True}

    async def stream(session, started: asyncio.Queue):
        async with session.post(gateway + "/v1/completions", json=body) as resp:
            replica, last = resp.headers.get("X-Replica-Id"), ""
            async for line in resp.content:
                if line.strip():
                    if not last:
                        started.put_nowait(replica)
                    last = line.decode().strip()
        ok = last == "data: [DONE]"
        return replica, ok if ok else last[:200]

    async def scenario():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            started: asyncio.Queue = asyncio.Queue()
            tasks = [asyncio.create_task(stream(session, started)) for _ in range(6)]
            while await asyncio.wait_for(started.get(), 60) != "replica-worker-127.0.0.5":
                pass
            leaving.terminate()  # SIGTERM while a stream on its replica is under way
            ended = await asyncio.gather(*tasks)
            # New requests meanwhile go to the other replicas.
            after = []
            for _ in range(6):
                async with session.post(gateway + "/v1/completions", json={**body, "stream": False,
                                                                            "max_tokens": 2}) as resp:
                    after.append((resp.status, resp.headers.get("X-Replica-Id")))
                    jsonlib.loads(await resp.read())
            return ended, after

    ended, after = asyncio.run(scenario())
    on_leaving = [ok for rid, ok in ended if rid == "replica-worker-127.0.0.5"]
    assert on_leaving and all(ok is True for ok in on_leaving), ended
    assert all(ok is True for rid, ok in ended), ended
    assert all(status == 200 and rid != "replica-worker-127.0.0.5" for status, rid in after), after
    assert leaving.wait(120) == 0
    assert not processes.tree({node["pid"]}, {node["ray_pgid"]})
    released = [e for e in c.head.events() if e["event"] == "worker_released"]
    assert released and released[-1]["node_id"] == "worker-127.0.0.5"
    worker_moves = [(t["from"], t["to"]) for t in tk.transitions(leaving.events(), "worker-127.0.0.5")]
    assert worker_moves[-2:] == [("SERVING", "DRAINING"), ("DRAINING", "STOPPED")]
    st = tk.wait_cluster_state(c.control_port, "DEGRADED", 60)
    assert {r["state"] for r in st["replicas"]} == {"READY"} and len(st["replicas"]) == 2
    chaos_report(fault="SIGTERM to a worker under load", requests=len(ended) + len(after),
                 failed=sum(1 for _, ok in ended if ok is not True),
                 lost=sum(1 for status, _ in after if status != 200))
