"""The gateway on a real two-node cluster (head + 1 local worker, one vLLM CPU
engine each, an API key): routes, streaming, balancing, bad input, a node
killed under load, and SIGTERM under load. The last test stops the cluster."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import time

import aiohttp
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from openai import OpenAI

from bench import output as bench_output
from bench import sweep
from controller import processes
from controller import testing as tk

from .conftest import serving_cluster

ENGINES_TIMEOUT = 420
API_KEY = "test-key-not-secret-4d1f"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_BODY = 65536


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    c = serving_cluster(tmp_path_factory.mktemp("gateway"), ENGINES_TIMEOUT, local_workers=1,
                        extra=("--engine", "vllm", "--wait-timeout", "400", "--max-body-bytes", str(MAX_BODY)),
                        env={"LLMCTL_API_KEY": API_KEY})
    c.url = f"http://127.0.0.1:{c.status()['gateway']['port']}"
    yield c
    left = c.cleanup()
    assert not left, f"processes left: {sorted(left)}"


def client(gw) -> OpenAI:
    return OpenAI(base_url=gw.url + "/v1", api_key=API_KEY, timeout=60, max_retries=0)


def requests_served(gw) -> int:
    return sum(r["requests"] for r in gw.status()["replicas"])


def test_openai_client_through_the_gateway(gw):
    c = client(gw)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    out = c.completions.create(model="tiny", prompt="the cluster", max_tokens=4, temperature=0)
    assert out.usage.completion_tokens == 4 and out.choices[0].text
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                     extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 3
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=5, stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    # Chunks are not tokens: vLLM holds back a token that ends inside a UTF-8 character
    # and sends it with the next one (random weights make many such tokens), so count
    # tokens by the usage chunk. That streams arrive as generated: the next test.
    assert chunks[-1].usage.completion_tokens == 5
    assert any(ch.choices and ch.choices[0].delta.content for ch in chunks)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    # The access log line follows the response's last byte, so the client can be first.
    log = tk.wait_for(lambda: [e for e in gw.head.events() if e["event"] == "request"
                               and e["route"] == "/v1/chat/completions" and e["completion_tokens"] == 5]
                      and [e for e in gw.head.events() if e["event"] == "request"], 10, 0.1, what="the stream logged")
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= {e["route"] for e in log}
    assert any(e["completion_tokens"] == 4 and e["status"] == 200 and e["replica_id"] for e in log)


def stream_events(gw) -> list[dict]:
    """The gateway's `request` events of streams, oldest first (with their relay figures)."""
    return [e for e in gw.head.events() if e["event"] == "request" and "upstream_reads" in e]


def test_streaming_passes_tokens_as_they_are_generated(gw):
    """The gateway writes each chunk of a stream on as soon as it has read it from
    the replica, judged by the gateway's own figures for the stream (its `request`
    event), not by when this client got round to reading: on this busy 2-core
    machine a client that reads half a second late gets a whole stream within
    15 ms (CI once saw 96 chunks within 14 ms), a starved head reads a backlog at
    once, and the engine itself at times sends a whole stream's token events at
    once; none of that is the gateway holding chunks. A gateway that held chunks
    back fails here (held for most of the generation); one that waited for the
    replica's whole answer fails in tests/unit/test_gateway_relay.py, where the
    replica sends each chunk only once the client has the one before."""
    logged = len(stream_events(gw))
    stream = client(gw).completions.create(model="tiny", prompt="a long answer", max_tokens=480, stream=True,
                                           temperature=0, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True})
    arrivals = []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.monotonic())
    assert len(arrivals) >= 240  # chunks are not tokens (see above), but most are
    event = tk.wait_for(lambda: next((e for e in stream_events(gw)[logged:] if e["completion_tokens"] == 480), None),
                        10, 0.1, what="the stream logged")
    print(f"480 tokens: the gateway read {event['upstream_reads']} chunks over {event['upstream_span_ms']} ms, held "
          f"each at most {event['max_relay_ms']} ms ({event['relays_over_10ms']} over 10 ms); this client got "
          f"{len(arrivals)} text chunks over {round((arrivals[-1] - arrivals[0]) * 1000, 1)} ms")
    assert event["status"] == 200 and event["upstream_reads"] >= 1
    # Held under 10 ms, 95% of chunks at least: a loaded machine held 4224 chunks 0.07 ms at
    # the median, 9.9 ms at most, and another run 1 of 143 for 12.7 ms (the gateway preempted
    # between read and write, as its write woke the client); a buffer holds nearly every chunk.
    assert event["relays_over_10ms"] <= max(2, event["upstream_reads"] // 20), event


def test_the_sweep_benchmark_runs_against_the_gateway(gw, tmp_path):
    """CI's smoke run of bench/: the open-loop generator, the report and the plots,
    against the real gateway (short and light: a smoke run, not a measurement)."""
    out = tmp_path / "sweep.json"
    assert sweep.main(["--gateway-url", gw.url, "--api-key", API_KEY, "--rates", "2", "4", "--duration", "3",
                       "--max-tokens", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    raw_path = tmp_path / "raw" / "sweep.json.gz"  # the samples live beside the summary, out of git
    raw = bench_output.read_raw(raw_path)
    assert [r["rate"] for r in result["runs"]] == [2, 4]
    for run, full in zip(result["runs"], raw["runs"], strict=True):
        report = run["report"]
        assert report["requests"] == len(full["samples"]) > 0 and report["ok"] == report["requests"], report
        assert all(s["tokens"] == 4 and s["ttft"] <= s["latency"] for s in full["samples"])
        assert 0 < report["ttft_s"]["p50"] <= report["latency_s"]["p50"] <= report["latency_s"]["max"]
    assert API_KEY not in out.read_text()
    assert API_KEY not in json.dumps(raw)
    assert "| offered/s |" in out.with_suffix(".md").read_text()
    assert (tmp_path / "sweep-cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("method,path,headers,body,status,code", [
    ("POST", "/v1/completions", {}, b'{"model": "tiny", "prompt": "x"}', 401, "invalid_api_key"),
    ("POST", "/v1/completions", {"Authorization": "Bearer wrong"}, b'{"prompt": "x"}', 401, "invalid_api_key"),
    ("GET", "/v1/models", {"Authorization": "Basic " + API_KEY}, None, 401, "invalid_api_key"),
    ("POST", "/v1/completions", AUTH, b'{"model": "tiny", "prompt": ', 400, "invalid_json"),
    ("POST", "/v1/completions", AUTH, b'["a list"]', 400, "invalid_json"),
    ("POST", "/v1/completions", AUTH, b'{"prompt": "\xff\xfe"}', 400, "invalid_json"),
    ("POST", "/v1/chat/completions", {**AUTH, "Content-Type": "text/plain"}, b'{}', 415, "unsupported_media_type"),
    ("POST", "/v1/completions", AUTH, b'{"prompt": "' + b"x" * MAX_BODY + b'"}', 413, "body_too_large"),
    ("POST", "/v1/embeddings", AUTH, b'{}', 404, "unknown_route"),
    ("GET", "/v1/completions", AUTH, None, 405, "method_not_allowed"),
])
def test_bad_input_gets_a_4xx_with_an_openai_error_and_no_replica_is_bothered(gw, method, path, headers,
                                                                              body, status, code):
    import urllib.error
    import urllib.request

    before = requests_served(gw)
    headers = {"Content-Type": "application/json", **headers}
    req = urllib.request.Request(gw.url + path, data=body, headers=headers, method=method)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == status
    error = json.loads(err.value.read())["error"]
    assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
    assert requests_served(gw) == before
    assert API_KEY not in gw.head.log_path.read_text()  # the key is never logged


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False),
                         st.text(max_size=30))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3) |
                           st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
# Request bodies a hostile or broken client sends: noise, broken JSON, invalid UTF-8, JSON of
# the wrong shape, and completions with wrong or extreme parameters (kept cheap for the engine).
BODIES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=100).map(lambda t: t.encode()),
    st.just(b'{"prompt": "\xff\xfe\xc3\x28"}'),
    JSON_VALUES.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={
        "model": st.sampled_from(["tiny", "other", "", 7]),
        "prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(-5, 3000), max_size=5), st.integers()),
        "messages": st.one_of(st.just([{"role": "user", "content": "hi"}]), JSON_VALUES),
        "max_tokens": st.sampled_from([-1, 0, 1, 2, "two", 10**9, None]),
        "stream": st.sampled_from([True, False, "yes", None]),
        "temperature": st.sampled_from([0, -1, 1e9, "hot"]),
        "n": st.sampled_from([1, 0, -3]),
    }).map(lambda d: json.dumps(d).encode()),
)


def raw_request(port: int, method: str, path: str, headers: dict[str, str], body: bytes | None,
                timeout: float = 60) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]),
       path=st.one_of(st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                                       "/v1/../status", "/v1/completions?x=%ff", "//v1//models", "/%00"]),
                      st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20)
                      .map(lambda t: "/" + t)),
       auth=st.sampled_from([AUTH, {}, {"Authorization": "Bearer "}, {"Authorization": API_KEY},
                             {"Authorization": "Bearer " + API_KEY + "x"}]),
       content_type=st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1",
                                     "multipart/form-data", None]),
       body=st.one_of(st.none(), BODIES))
def test_hostile_http_gets_4xx_and_the_gateway_stays_up(gw, method, path, auth, content_type, body):
    port = int(gw.url.rsplit(":", 1)[1])
    headers = {**auth, **({"Content-Type": content_type} if content_type else {})}
    status = raw_request(port, method, path, headers, body)
    # 2xx when a well-formed request reached an engine; 4xx for every fault of the client;
    # never a 5xx: the gateway did not break and no replica failed because of it.
    assert status < 500, (method, path, headers, body, status)
    assert raw_request(port, "GET", "/health", {}, None, timeout=10) == 200


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD"]),
       path=st.one_of(st.sampled_from(["/status", "/ready", "/healthz", "/metrics", "/drain", "/status?x=1",
                                       "/../status", "/%ff"]),
                      st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=20)
                      .map(lambda t: "/" + t)),
       body=st.one_of(st.none(), BODIES))
def test_hostile_http_on_the_control_port_gets_4xx_and_it_stays_up(gw, method, path, body):
    assume(not (method == "POST" and path.split("?")[0] == "/drain"))  # that one is a real drain
    status = raw_request(gw.control_port, method, path, {"Content-Type": "application/json"}, body)
    assert status < 500, (method, path, body, status)
    assert raw_request(gw.control_port, "GET", "/healthz", {}, None, timeout=10) == 200


async def test_a_slow_client_does_not_hold_up_the_others(gw):
    """A client that trickles its body a byte at a time (slowloris) while others are served."""
    port = int(gw.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": "tiny", "prompt": "slow", "max_tokens": 2}).encode()
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode())
    await writer.drain()

    async def trickle():
        for byte in body[:20]:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.2)

    trickling = asyncio.create_task(trickle())
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        t0 = time.monotonic()
        results = [await post_completion(session, gw.url) for _ in range(10)]
        took = time.monotonic() - t0
    assert [r[0] for r in results] == [200] * 10
    assert not trickling.done(), "the slow client should still be trickling"
    assert took < 3.5, took  # ten small completions, not held behind the slow one (it trickles 4 s)
    trickling.cancel()
    writer.close()


async def test_a_client_that_leaves_mid_stream_is_noticed_and_its_stream_released(gw):
    # A raw connection, dropped at the first token (aiohttp's client would keep the
    # connection in its pool and the stream would run to its end unnoticed).
    port = int(gw.url.rsplit(":", 1)[1])
    gone_before = gw.status()["gateway"]["counts"].get("clients_gone", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": "tiny", "prompt": "leave", "max_tokens": 480, "ignore_eos": True,
                       "stream": True}).encode()
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    while b"data:" not in await asyncio.wait_for(reader.readline(), 30):
        pass
    writer.close()  # hang up mid-stream
    await writer.wait_closed()  # the socket is closed only once this loop runs again
    # The gateway notices at once and releases the replica's stream: nothing stays in
    # flight, and the request counts as a client gone (499), not as a stream served to
    # its end for no one.
    status = await asyncio.to_thread(
        tk.wait_for, lambda: (s := gw.status())["gateway"]["in_flight"] == 0
        and all(r["in_flight"] == 0 for r in s["replicas"]) and s, 10, 0.1, "the stream's replica released")
    assert status["gateway"]["counts"].get("clients_gone", 0) == gone_before + 1, status["gateway"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        assert (await post_completion(session, gw.url))[0] == 200


def test_health_needs_no_key(gw):
    status, body = tk.get_json(gw.url + "/health")
    assert status == 200 and body["ready"] is True and body["replicas"] == 2


async def post_completion(session: aiohttp.ClientSession, url: str, max_tokens: int = 4,
                          stream: bool = False) -> tuple[int, str | None, float, float]:
    """One request: (status or -1 for a connection error, replica id, start, end)."""
    body = {"model": "tiny", "prompt": "load", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}
    start = time.monotonic()
    try:
        async with session.post(url + "/v1/completions", json=body, headers=AUTH) as resp:
            text = await resp.text()
            if resp.status == 200 and stream:
                assert text.rstrip().endswith("data: [DONE]"), text[-200:]
            return resp.status, resp.headers.get("X-Replica-Id"), start, time.monotonic()
    except aiohttp.ClientError:
        return -1, None, start, time.monotonic()


async def test_requests_are_balanced_over_the_two_replicas(gw):
    # One request at a time: each one finds both replicas idle, a tie the balancer
    # breaks at random. (Under concurrent load the split follows the replicas' speed,
    # which is least-outstanding doing its job; on this 2-core machine one engine
    # shares its core with the gateway and the client and is slower. The unit tests
    # cover least-outstanding.)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        results = [await post_completion(session, gw.url) for _ in range(200)]
    assert [r[0] for r in results] == [200] * 200
    counts = {rid: sum(1 for r in results if r[1] == rid) for rid in {r[1] for r in results}}
    mean_s = {rid: round(sum(r[3] - r[2] for r in results if r[1] == rid) / n, 3) for rid, n in counts.items()}
    print(f"200 requests over the replicas: {counts}, mean latency {mean_s}, "
          f"replicas {[(r['replica_id'], r['in_flight'], r['requests']) for r in gw.status()['replicas']]}")
    assert len(counts) == 2
    assert all(70 <= n <= 130 for n in counts.values()), counts


async def run_load(url: str, stop: asyncio.Event, concurrency: int, **kwargs) -> list[tuple]:
    """Closed-loop workers sending completions until `stop` is set."""
    results: list[tuple] = []

    async def worker(session):
        while not stop.is_set():
            results.append(await post_completion(session, url, **kwargs))

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return results


async def stream_frozen_on(replica_id: str, streams: list[asyncio.Task], started: asyncio.Queue) -> bool:
    """With the replica's node frozen: is a stream on it still under way? One second
    lets this client read whatever was sent before the freeze; then any stream whose
    first token came from the replica and that has not ended is stuck midway. (One
    first token of it was taken off `started` already.)"""
    await asyncio.sleep(1.0)
    on_it = 1
    while not started.empty():
        on_it += started.get_nowait() == replica_id
    ended = sum(1 for t in streams if t.done() and not t.exception() and t.result()[0] == replica_id)
    return on_it > ended


async def freeze_under_a_stream(session: aiohttp.ClientSession, gw, victim_replica: str, victim_pids: set[int]
                                ) -> tuple[list[asyncio.Task], float, int]:
    """Long streams, and the victim's node frozen at a stream's first token on its
    replica, as a machine failure begins, once this client sees that stream cut off
    midway. (On a busy machine this client can read the first token when the stream,
    under a second long here, is all but over: then thaw and try again, 3 times.)
    Returns the streams, when the node froze, and the try. The node stays frozen."""
    for attempt in range(3):
        started: asyncio.Queue = asyncio.Queue()
        streams = [asyncio.create_task(long_stream(session, gw.url, started)) for _ in range(6)]
        while await asyncio.wait_for(started.get(), 60) != victim_replica:
            pass
        frozen_at = time.monotonic()
        processes.signal_all(victim_pids, signal.SIGSTOP)
        if await stream_frozen_on(victim_replica, streams, started):
            return streams, frozen_at, attempt
        processes.signal_all(victim_pids, signal.SIGCONT)
        await asyncio.gather(*streams)
        await asyncio.to_thread(tk.wait_cluster_state, gw.control_port, "SERVING", 60)
    pytest.fail("no stream on the victim's replica was still under way when its node froze, 3 tries")


async def long_stream(session: aiohttp.ClientSession, url: str, started: asyncio.Queue
                      ) -> tuple[str | None, str, float]:
    """A long streaming completion (about a second here): (replica id, how it ended:
    'done', 'error event' or other, when). Puts its replica id on `started` at its first token."""
    body = {"model": "tiny", "prompt": "long", "max_tokens": 480, "ignore_eos": True, "stream": True}
    async with session.post(url + "/v1/completions", json=body, headers=AUTH) as resp:
        replica, last = resp.headers.get("X-Replica-Id"), ""
        async for line in resp.content:
            if line.strip():
                if not last:
                    started.put_nowait(replica)
                last = line.decode().strip()
    ended = time.monotonic()
    if last == "data: [DONE]":
        return replica, "done", ended
    if last.startswith("data: ") and "error" in json.loads(last[6:]):
        return replica, "error event", ended
    return replica, f"other: {last[:100]}", ended


@pytest.mark.chaos
async def test_a_frozen_node_is_found_stalled_within_seconds_and_its_streams_finish_elsewhere(gw, chaos_report):
    """Every process of the worker node frozen (SIGSTOP: a hung machine, its TCP
    still accepting) while streams run on its replica: the gateway sees no token
    come, its engine's metrics do not answer, the replica is marked stalled
    (DEGRADED, engine_stalled) within seconds, and its streams continue on the
    head's replica. Thawed, the node serves again."""
    s = gw.record()
    victim = next(n for n in s["nodes"] if n["role"] == "worker")
    victim_replica = f"replica-{victim['node_id']}"
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(gw.url, stop, concurrency=4))
    await asyncio.sleep(3)
    victim_pids = await asyncio.to_thread(tk.node_pids, victim, s["nodes"])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        streams, frozen_at, attempt = await freeze_under_a_stream(session, gw, victim_replica, victim_pids)
        try:
            degraded = await asyncio.to_thread(tk.wait_cluster_state, gw.control_port, "DEGRADED", 30)
            detect_s = time.monotonic() - frozen_at
        finally:
            # Thawed once seen: Ray declares a node silent for about 7 s dead, which
            # is another test's fault.
            processes.signal_all(victim_pids, signal.SIGCONT)
        ended = await asyncio.gather(*streams)
    stop.set()
    results = await load
    on_victim = [how for rid, how, at in ended if rid == victim_replica and at > frozen_at]
    print(f"node frozen (try {attempt + 1}): DEGRADED after {detect_s:.2f}s; {len(on_victim)} streams on its "
          f"replica ended {on_victim}; all {[(rid, how) for rid, how, _ in ended]}")
    assert on_victim and all(how == "done" for _, how, _ in ended), ended
    assert degraded["cluster"]["state"] == "DEGRADED"
    move = next(t for t in reversed(tk.transitions(gw.head.events(), "head-127.0.0.2")) if t["to"] == "DEGRADED")
    assert move["trigger"] == "engine_stalled" and move["reason"].startswith(f"{victim_replica} stalled"), move
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:5]
    back = await asyncio.to_thread(tk.wait_cluster_state, gw.control_port, "SERVING", 90)
    assert {r["state"] for r in back["replicas"]} == {"READY"}
    gateway = back["gateway"]
    assert gateway["stalls"] >= 1 and gateway["continuations"].get("stall", 0) >= len(on_victim), gateway
    chaos_report(fault="worker node frozen (SIGSTOP of every process) under load", detect_s=detect_s,
                 recover_s=time.monotonic() - frozen_at, requests=len(results) + len(ended),
                 failed=len(failed) + sum(1 for _, how, _ in ended if how != "done"))


@pytest.mark.chaos
async def test_killing_a_replicas_node_under_load_loses_no_request_started_after(gw, chaos_report):
    s = gw.record()
    failed_before = dict(s["gateway"]["requests_failed"])
    victim = next(n for n in s["nodes"] if n["role"] == "worker")
    victim_replica = f"replica-{victim['node_id']}"
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(gw.url, stop, concurrency=4))
    await asyncio.sleep(4)
    # The node's processes, found now: at the stream's first token the SIGKILL must land
    # at once (a stream lasts about a second here; finding them takes a good part of it).
    victim_pids = await asyncio.to_thread(tk.node_pids, victim, s["nodes"])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        streams, killed_at, attempt = await freeze_under_a_stream(session, gw, victim_replica, victim_pids)
        assert not await asyncio.to_thread(processes.kill_now, victim_pids)
        ended = await asyncio.gather(*streams)
    await asyncio.sleep(12)
    stop.set()
    results = await load
    # Streams on the dead replica are continued on the other one (the freeze is seen
    # as a stall, the SIGKILL as a reset, whichever comes first): every one runs to
    # its end, none ends with an error event.
    on_victim = [how for rid, how, at in ended if rid == victim_replica and at > killed_at]
    elsewhere = [how for rid, how, at in ended if rid != victim_replica]
    print(f"streams when the node died (try {attempt + 1}): {len(on_victim)} on its replica ended with {on_victim}, "
          f"{len(elsewhere)} elsewhere with {elsewhere}; all: "
          f"{[(rid, how, round(at - killed_at, 2)) for rid, how, at in ended]}")
    assert on_victim and all(how == "done" for how in on_victim), on_victim
    assert all(how == "done" for how in elsewhere)
    gateway = gw.status()["gateway"]
    assert sum(gateway["continuations"].values()) >= len(on_victim), gateway
    assert gateway["requests_failed"] == failed_before, gateway
    before = [r for r in results if r[2] < killed_at]
    after = [r for r in results if r[2] >= killed_at]
    in_flight_failed = [r for r in before if r[0] != 200]
    after_failed = [r for r in after if r[0] != 200]
    print(f"node kill under load: {len(before)} requests started before the kill "
          f"({len(in_flight_failed)} failed), {len(after)} after ({len(after_failed)} failed)")
    assert len(after) >= 20 and not after_failed, after_failed[:5]
    assert not in_flight_failed  # refused, or cut mid-answer: retried or continued on the other replica
    chaos_report(fault="worker node SIGKILL under load (gateway)", requests=len(results) + len(ended),
                 failed=sum(1 for _, how, _ in ended if how != "done") + len(in_flight_failed),
                 lost=len(after_failed))
    st = tk.wait_cluster_state(gw.control_port, "DEGRADED", 30)
    assert st["gateway"]["counts"].get("retries", 0) >= 1 or st["gateway"]["counts"].get("replicas_marked_unhealthy")
    moves = tk.transitions(gw.head.events(), "head-127.0.0.2")
    assert moves[-1]["to"] == "DEGRADED"


@pytest.mark.chaos
async def test_sigterm_under_load_finishes_in_flight_then_503_then_stopped(gw, chaos_report):
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(gw.url, stop, concurrency=4))
    # The signal must find requests in flight, however late this client (on 2 cores
    # shared with the engines) reads a stream's first token, and however late the
    # head's loop gets to the signal: a stream is often over in about a second here,
    # and signalling at a first token, or when /status counted some in flight, once
    # left the gateway none to drain. So the engines freeze while two long streams
    # are under way, the head gets SIGTERM, and the engines thaw: the drain must wait
    # for both streams to end.
    cores = [tk.engine_core_pid(r["pid"]) for r in gw.status()["replicas"] if r["state"] == "READY"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for attempt in range(3):
            started: asyncio.Queue = asyncio.Queue()
            long_ones = [asyncio.create_task(long_stream(session, gw.url, started)) for _ in range(2)]
            for _ in long_ones:
                await asyncio.wait_for(started.get(), 60)
            processes.signal_all(set(cores), signal.SIGSTOP)
            await asyncio.sleep(1.0)  # let this client read what was sent before the freeze
            held = sum(1 for t in long_ones if not t.done())
            if held:
                break
            processes.signal_all(set(cores), signal.SIGCONT)
            await asyncio.gather(*long_ones)
        else:
            pytest.fail("both long streams had ended before the engines froze, 3 tries")
        try:
            signalled_at = time.monotonic()
            gw.head.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            ready = await asyncio.to_thread(tk.get_json, f"http://127.0.0.1:{gw.control_port}/ready")
            assert ready[0] == 503  # the control port says it too
        finally:
            processes.signal_all(set(cores), signal.SIGCONT)
        long_ended = await asyncio.gather(*long_ones)
    assert [how for _, how, _ in long_ended] == ["done", "done"], long_ended
    await asyncio.sleep(max(0.0, signalled_at + 4.0 - time.monotonic()))
    stop.set()
    results = await load
    # What the gateway had accepted when the drain began must finish; a request the
    # client sent just before the signal may reach the gateway after it: 503, not lost.
    # A request sent within a moment after the signal may still beat the handler.
    events = gw.head.events()
    accepted = next(e["in_flight"] for e in events if e["event"] == "gateway_draining")
    unfinished = next(e["unfinished"] for e in events if e["event"] == "gateway_drained")
    assert unfinished == 0
    handled_by = signalled_at + 0.2
    straddling = [r for r in results if r[2] < signalled_at <= r[3]]
    racing = [r for r in results if signalled_at <= r[2] < handled_by]
    later = [r for r in results if r[2] >= handled_by]
    print(f"SIGTERM under load (try {attempt + 1}): the gateway had {accepted} in flight ({held} long streams held "
          "by the freeze, both done); the client's "
          f"{len(straddling)} straddling "
          f"the signal answered {[r[0] for r in straddling]}, {len(racing)} sent within 0.2 s answered "
          f"{sorted({r[0] for r in racing})}, {len(later)} later answered {sorted({r[0] for r in later})} "
          "(-1: refused once the process ended)")
    assert accepted >= held  # at least the long streams the freeze held
    assert all(r[0] in (200, 503) for r in straddling + racing)
    # Every accepted stream ran to [DONE]: the two long ones (asserted above) and the load's.
    assert sum(1 for r in straddling if r[0] == 200) + len(long_ended) >= accepted
    assert later and all(r[0] in (503, -1) for r in later) and any(r[0] == 503 for r in later)
    assert await asyncio.to_thread(gw.head.wait, 180) == 0
    chaos_report(fault="SIGTERM to the head under load", requests=len(results) + len(long_ended),
                 failed=sum(1 for r in straddling if r[0] not in (200, 503)), lost=unfinished)
    moves = tk.transitions(gw.head.events(), "head-127.0.0.2")
    assert moves[-1]["to"] == "STOPPED" and moves[-1]["trigger"] == "drained"
    await asyncio.to_thread(tk.wait_for, lambda: not gw.leftovers(), 30, what="no process of the test left")
