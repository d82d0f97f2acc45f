"""The gateway relays a stream chunk by chunk, in process on loopback: a fake
replica sends each SSE event only once the client has the one before, so a
gateway that held chunks back (read the whole body, or batched writes) stalls
the exchange and fails here, whatever the machine's load."""

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from controller.cluster.records import ReplicaState, ReplicaStatus
from controller.serving.gateway import Gateway, RelayFigures

EVENTS = 8
LOCKSTEP_TIMEOUT_S = 5.0


async def _start(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


def _event(i: int) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "text": f"t{i}"}]}).encode() + b"\n\n"


async def _lockstep_stream(seen: list[asyncio.Event], stalled: list[int]):
    """A replica whose event i+1 goes out only once the client has seen event i."""
    async def completions(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(EVENTS):
            await response.write(_event(i))
            try:
                await asyncio.wait_for(seen[i].wait(), LOCKSTEP_TIMEOUT_S)
            except asyncio.TimeoutError:
                stalled.append(i)  # the gateway sat on event i: give up, the test fails
                break
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    return await _start(app)


async def test_each_chunk_reaches_the_client_before_the_replica_sends_the_next():
    seen = [asyncio.Event() for _ in range(EVENTS)]
    stalled: list[int] = []
    upstream, port = await _lockstep_stream(seen, stalled)
    gw = Gateway("127.0.0.1", 0, liveness_interval=60)
    await gw.start()
    try:
        gw.update_replicas([ReplicaStatus("r0", None, f"http://127.0.0.1:{port}", ReplicaState("READY"))])
        gw_port = gw._runner.addresses[0][1]
        lines = []
        with capture_logs() as logs:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                async with session.post(f"http://127.0.0.1:{gw_port}/v1/completions",
                                        json={"prompt": "x", "stream": True}) as resp:
                    assert resp.status == 200 and resp.headers["X-Replica-Id"] == "r0"
                    async for line in resp.content:
                        if line.startswith(b"data: {"):
                            i = int(json.loads(line[6:])["choices"][0]["text"][1:])
                            seen[i].set()
                        if line.strip():
                            lines.append(line.strip())
            for _ in range(100):  # the access log follows the response's last byte
                if any(e["event"] == "request" for e in logs):
                    break
                await asyncio.sleep(0.01)
        assert not stalled, f"the gateway held event {stalled[0]} back"
        assert lines[-1] == b"data: [DONE]" and len(lines) == EVENTS + 1
        event = next(e for e in logs if e["event"] == "request")
        # One read per event the replica sent (each went out alone), each written at once
        # (a write to loopback takes microseconds; 100 ms leaves room for a busy machine).
        assert event["status"] == 200 and event["upstream_reads"] == EVENTS + 1, event
        assert event["upstream_span_ms"] > 0 and 0 <= event["max_relay_ms"] < 100, event
        assert event["relays_over_10ms"] <= 1, event
    finally:
        await gw.stop()
        await upstream.cleanup()


def test_relay_figures_keep_the_reads_their_span_and_the_longest_hold():
    figures = RelayFigures()
    assert figures.fields() == {"upstream_reads": 0, "upstream_span_ms": 0.0, "max_relay_ms": 0.0,
                                "relays_over_10ms": 0}
    figures.add(10.0, 10.001)
    figures.add(10.2, 10.23)  # held 30 ms: the longest, and slow
    figures.add(10.5, 10.5005)
    figures.add(10.6, 10.612)  # slow too
    assert figures.fields() == {"upstream_reads": 4, "upstream_span_ms": pytest.approx(600.0),
                                "max_relay_ms": pytest.approx(30.0), "relays_over_10ms": 2}


async def test_a_client_that_asks_for_no_stream_gets_one_answer_built_from_the_engines_stream():
    asked = []

    async def completions(request: web.Request) -> web.StreamResponse:
        asked.append(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": "cmpl-1", "object": "text_completion", "created": 7, "model": "tiny"}
        for i, (text, finish) in enumerate([(" a", None), (" b", "length")]):
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": None,
                      "prompt_token_ids": [5, 6] if i == 0 else None, "token_ids": [10 + i]}
            await response.write(b"data: " + json.dumps({**base, "choices": [choice]}).encode() + b"\n\n")
        usage = {"prompt_tokens": 2, "total_tokens": 4, "completion_tokens": 2}
        await response.write(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    upstream, port = await _start(app)
    gw = Gateway("127.0.0.1", 0, liveness_interval=60)
    await gw.start()
    try:
        gw.update_replicas([ReplicaStatus("r0", None, f"http://127.0.0.1:{port}", ReplicaState("READY"))])
        with capture_logs() as logs:
            async with aiohttp.ClientSession() as session:
                async with session.post(f"http://127.0.0.1:{gw._runner.addresses[0][1]}/v1/completions",
                                        json={"prompt": "x", "max_tokens": 2}) as resp:
                    assert resp.status == 200 and resp.content_type == "application/json"
                    answer = await resp.json()
        assert asked[0]["stream"] is True and asked[0]["return_token_ids"] is True
        assert answer["id"] == "cmpl-1" and answer["created"] == 7 and answer["object"] == "text_completion"
        assert answer["choices"][0]["text"] == " a b" and answer["choices"][0]["finish_reason"] == "length"
        assert answer["choices"][0]["token_ids"] is None  # not asked for by the client
        assert answer["usage"] == {"prompt_tokens": 2, "total_tokens": 4, "completion_tokens": 2}
        event = next(e for e in logs if e["event"] == "request")
        assert event["completion_tokens"] == 2 and event["status"] == 200
    finally:
        await gw.stop()
        await upstream.cleanup()
