"""A client never sees a replica fail: the gateway against fake vLLM replicas.

Each fake replica is a small aiohttp server on loopback that speaks vLLM
0.32's stream format (completions and chat, with `return_token_ids`) and is a
deterministic engine: a token is a function of the whole token sequence before
it, so an answer continued from its prompt and generated ids is the answer an
unbroken engine gives (temperature 0). The replicas of one test share a plan
that says which request (by its order of arrival, replica and prompt) breaks,
how, and after how many tokens: the connection closed or reset, the stream
hung (its engine's token counter still), or paused while its engine's counter
grows (a busy engine, not a stalled one).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from controller.cluster.records import ReplicaState, ReplicaStatus
from controller.serving.gateway import Gateway

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MODEL = "tiny"
FINGERPRINT = "vllm-0.32.0-a0b53792"
DEFAULT_MAX_TOKENS = 16
CLIENT_TIMEOUT_S = 8.0  # every request of this file ends well before: a hang fails, not stalls CI


# -- the deterministic engine ------------------------------------------------------------------

def next_token(ids: list[int]) -> int:
    return (sum(ids) * 31 + len(ids)) % 1000 + 100


def token_text(token: int) -> str:
    return f" w{token}"


def tokenize(text: str) -> list[int]:
    return [100 + (ord(c) * 7) % 300 for c in text]


def chat_ids(messages: list[dict[str, Any]]) -> list[int]:
    """A chat template: each message framed by its role's token and an end token."""
    ids = [1]
    for m in messages:
        ids += [{"system": 10, "user": 11, "assistant": 12}[m["role"]], *tokenize(m["content"]), 2]
    return ids + [12]


def unbroken(prompt_ids: list[int], n: int) -> list[int]:
    """The tokens of an answer no failure interrupted."""
    out: list[int] = []
    for _ in range(n):
        out.append(next_token(prompt_ids + out))
    return out


def unbroken_text(prompt_ids: list[int], n: int) -> str:
    return "".join(token_text(t) for t in unbroken(prompt_ids, n))


@dataclass
class Fault:
    kind: str         # close (FIN mid-answer), rst (a reset), hang, pause (counter moves), hang_before_headers
    after: int = 0    # tokens sent before it (per choice)
    pause_s: float = 0.0


Plan = Callable[[int, str, list[int], dict[str, Any]], "Fault | None"]


def sse(event: Any) -> bytes:
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


class Cluster:
    """The fake replicas of one test, and what they were asked."""

    def __init__(self) -> None:
        self.plan: Plan = lambda seq, name, prompt_ids, body: None
        self.seen: list[tuple[str, str, dict[str, Any]]] = []  # (replica, route, body) in order of arrival
        self.engines: dict[str, FakeEngine] = {}
        self.release = asyncio.Event()  # ends every hung handler at teardown

    async def add(self, name: str, token_delay: float = 0.0) -> "FakeEngine":
        engine = FakeEngine(self, name, token_delay)
        await engine.start()
        self.engines[name] = engine
        return engine

    def asked(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        return [(route, body) for replica, route, body in self.seen if replica == name]

    def statuses(self) -> list[ReplicaStatus]:
        return [ReplicaStatus(name, None, e.url, ReplicaState.READY) for name, e in self.engines.items()]

    async def close(self) -> None:
        self.release.set()
        for engine in self.engines.values():
            await engine.runner.cleanup()


class FakeEngine:
    def __init__(self, cluster: Cluster, name: str, token_delay: float) -> None:
        self.cluster = cluster
        self.name = name
        self.token_delay = token_delay
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.running = 0
        self.frozen = False  # a frozen machine: its /metrics does not answer either
        self.url = ""
        self.runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post(COMPLETIONS, self.completions)
        app.router.add_post(CHAT, self.chat)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/health", self.health)
        # A handler whose client left is cancelled (as uvicorn does), and teardown waits little for the rest.
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"

    async def health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def metrics(self, request: web.Request) -> web.Response:
        if self.frozen:
            await self.cluster.release.wait()
        labels = f'{{engine="0",model_name="{MODEL}"}}'
        text = (f"# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
                f"# TYPE vllm:generation_tokens_total counter\n"
                f"vllm:generation_tokens_total{labels} {float(self.generation_tokens)}\n"
                f"vllm:prompt_tokens_total{labels} {float(self.prompt_tokens)}\n"
                f"vllm:num_requests_running{labels} {float(self.running)}\n"
                f"vllm:num_requests_waiting{labels} 0.0\n")
        return web.Response(text=text, content_type="text/plain")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body["prompt"]
        ids = tokenize(prompt) if isinstance(prompt, str) else list(prompt)
        return await self._answer(request, COMPLETIONS, body, ids)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return await self._answer(request, CHAT, body, chat_ids(body["messages"]))

    async def _answer(self, request: web.Request, route: str, body: dict[str, Any], ids: list[int]
                      ) -> web.StreamResponse:
        seq = len(self.cluster.seen)
        self.cluster.seen.append((self.name, route, body))
        fault = self.cluster.plan(seq, self.name, ids, body)
        chat = route == CHAT
        n = body.get("n") or 1
        max_tokens = (body.get("max_completion_tokens") if chat else None) or body.get("max_tokens") \
            or DEFAULT_MAX_TOKENS
        want_ids = bool(body.get("return_token_ids"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        ident = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:8]}",
                 "object": "chat.completion.chunk" if chat else "text_completion",
                 "created": int(time.time()), "model": MODEL}
        self.prompt_tokens += len(ids)
        if fault is not None and fault.kind in ("hang_before_headers", "freeze_before_headers"):
            self.frozen = fault.kind == "freeze_before_headers"
            await self.cluster.release.wait()
            raise ConnectionResetError
        generated: list[list[int]] = [[] for _ in range(n)]
        if not body.get("stream"):  # one JSON answer (the stall-clear probe; a request passed on as is)
            for c in range(n):
                for _ in range(max_tokens):
                    generated[c].append(next_token(ids + generated[c]))
            self.generation_tokens += n * max_tokens
            return web.json_response({**ident, "object": "text_completion", "choices": [
                {"index": c, "text": "".join(token_text(t) for t in generated[c]), "finish_reason": "length",
                 "token_ids": generated[c] if want_ids else None} for c in range(n)],
                "usage": {"prompt_tokens": len(ids), "total_tokens": len(ids) + n * max_tokens,
                          "completion_tokens": n * max_tokens}})
        self.running += 1
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
            await response.prepare(request)
            if chat:
                for c in range(n):
                    role = {**ident, "choices": [{"index": c, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
                    if want_ids:
                        role.update(prompt_token_ids=ids, prompt_text=None)
                    await response.write(sse(role))
            for step in range(max_tokens + 1):
                if fault is not None and step == fault.after:
                    await self._fault(request, fault)
                if step == max_tokens:
                    break
                if step and self.token_delay:
                    await asyncio.sleep(self.token_delay)
                for c in range(n):
                    token = next_token(ids + generated[c])
                    generated[c].append(token)
                    self.generation_tokens += 1
                    finish = "length" if step == max_tokens - 1 else None
                    if chat:
                        choice = {"index": c, "delta": {"content": token_text(token)}, "logprobs": None,
                                  "finish_reason": finish}
                        if finish:
                            choice["stop_reason"] = None
                        choice["token_ids"] = [token] if want_ids else None
                    else:
                        choice = {"index": c, "text": token_text(token), "logprobs": None, "finish_reason": finish,
                                  "stop_reason": None,
                                  "prompt_token_ids": ids if want_ids and step == 0 else None,
                                  "token_ids": [token] if want_ids else None}
                    event = {**ident, "choices": [choice]}
                    if finish and not chat:
                        event["system_fingerprint"] = FINGERPRINT
                    await response.write(sse(event))
            if include_usage:
                completion = n * max_tokens
                await response.write(sse({**ident, "choices": [], "usage": {
                    "prompt_tokens": len(ids), "total_tokens": len(ids) + completion,
                    "completion_tokens": completion}}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        finally:
            self.running -= 1

    async def _fault(self, request: web.Request, fault: Fault) -> None:
        if fault.kind == "pause":  # silent to the gateway while the engine works on (other requests)
            end = time.perf_counter() + fault.pause_s
            while time.perf_counter() < end:
                await asyncio.sleep(0.05)
                self.generation_tokens += 1
            return
        if fault.kind in ("close", "rst"):
            if fault.kind == "rst":
                # Let the gateway read what was sent, then reset (SO_LINGER 0: an RST, not a FIN).
                await asyncio.sleep(0.02)
                sock = request.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            request.transport.close()
        # hang (and after a close: until the handler is cancelled): nothing more, the counter still
        await self.cluster.release.wait()
        raise ConnectionResetError


@pytest.fixture
async def cluster():
    c = Cluster()
    try:
        yield c
    finally:
        await c.close()


@contextlib.asynccontextmanager
async def gateway(cluster: Cluster, **kwargs: Any):
    gw = Gateway("127.0.0.1", 0, liveness_interval=60, **kwargs)
    await gw.start()
    try:
        gw.update_replicas(cluster.statuses())
        yield gw
    finally:
        await gw.stop()


# -- the client ------------------------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: Any
    events: list[Any]   # a stream's data payloads, parsed ("[DONE]" as is)
    body: Any = None    # a JSON answer


def parse_sse(raw: bytes) -> list[Any]:
    events = []
    for block in raw.split(b"\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith(b"data: "), block
        payload = block[6:]
        events.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return events


def gw_url(gw: Gateway, route: str) -> str:
    return f"http://127.0.0.1:{gw._runner.addresses[0][1]}{route}"


async def ask(gw: Gateway, route: str, body: dict[str, Any], timeout: float = CLIENT_TIMEOUT_S) -> Reply:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.post(gw_url(gw, route), json=body) as resp:
            raw = await resp.read()
            if resp.content_type == "text/event-stream":
                return Reply(resp.status, resp.headers, parse_sse(raw))
            return Reply(resp.status, resp.headers, [], json.loads(raw))


async def until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    """The gateway logs a request after its last byte: wait for it."""
    deadline = time.perf_counter() + timeout
    while not condition() and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)


def stream_text(events: list[Any], chat: bool, index: int = 0) -> str:
    out = []
    for e in events:
        if isinstance(e, dict):
            for c in e.get("choices") or []:
                if c["index"] == index:
                    out.append((c["delta"].get("content") or "") if chat else c["text"])
    return "".join(out)


def errors(events: list[Any]) -> list[dict[str, Any]]:
    return [e["error"] for e in events if isinstance(e, dict) and "error" in e]


def assert_one_unbroken_stream(events: list[Any], chat: bool, prompt_ids: list[int], max_tokens: int,
                               usage: bool) -> None:
    """What an unbroken engine stream gives a client that asked for no token ids."""
    assert not errors(events), errors(events)
    assert events.count("[DONE]") == 1 and events[-1] == "[DONE]", events[-3:]
    data = events[:-1]
    assert len({(e["id"], e["created"], e["model"]) for e in data}) == 1, {(e["id"], e["created"]) for e in data}
    assert {e["object"] for e in data} == {"chat.completion.chunk" if chat else "text_completion"}
    assert stream_text(events, chat) == unbroken_text(prompt_ids, max_tokens)
    choices = [c for e in data for c in e["choices"]]
    if chat:
        roles = [c for c in choices if "role" in c["delta"]]
        assert len(roles) == 1 and data[0]["choices"] == roles, "one role chunk, first"
        choices = [c for c in choices if "role" not in c["delta"]]
    assert len(choices) == max_tokens, "one event per token, none lost or repeated"
    assert [c["finish_reason"] for c in choices] == [None] * (max_tokens - 1) + ["length"]
    assert all(c.get("token_ids") is None and c.get("prompt_token_ids") is None for c in choices)
    assert all(e.get("prompt_token_ids") is None for e in data)  # the chat role chunk's, nulled
    usages = [e["usage"] for e in data if e.get("usage") is not None]
    if usage:
        assert usages == [{"prompt_tokens": len(prompt_ids), "total_tokens": len(prompt_ids) + max_tokens,
                           "completion_tokens": max_tokens}]
        assert data[-1]["choices"] == [] and data[-1]["usage"] == usages[0], "usage comes last"
    else:
        assert usages == []


async def unbroken_events(route: str, body: dict[str, Any]) -> list[Any]:
    """The stream a client gets through the gateway when nothing fails."""
    reference = Cluster()
    try:
        await reference.add("ref")
        async with gateway(reference) as gw:
            reply = await ask(gw, route, body)
    finally:
        await reference.close()
    assert reply.status == 200 and len(reference.seen) == 1
    return reply.events


def same_events(events: list[Any]) -> list[Any]:
    # id and created are each answer's own. system_fingerprint: a chat answer's continuation
    # ends with the completions engine's; whether vLLM's chat chunks carry one is not modelled.
    return [{k: v for k, v in e.items() if k not in ("id", "created", "system_fingerprint")}
            if isinstance(e, dict) else e for e in events]


def request_body(route: str, text: str, max_tokens: int, stream: bool = True, usage: bool = False,
                 **extra: Any) -> tuple[dict[str, Any], list[int]]:
    body: dict[str, Any] = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}
    if usage:
        body["stream_options"] = {"include_usage": True}
    if route == CHAT:
        body["messages"] = [{"role": "system", "content": "be brief"}, {"role": "user", "content": text}]
        return body, chat_ids(body["messages"])
    body["prompt"] = text
    return body, tokenize(text)


def first_request_breaks(kind: str, after: int) -> Plan:
    return lambda seq, name, prompt_ids, body: Fault(kind, after) if seq == 0 else None


# -- the fake engine itself --------------------------------------------------------------------

async def test_the_fake_engine_continues_an_answer_from_its_token_ids(cluster):
    """The premise of every test below: prompt + generated ids, sent back, give the
    rest of the unbroken answer (as a temperature-0 engine does)."""
    engine = await cluster.add("r0")
    prompt = tokenize("hello")
    async with aiohttp.ClientSession() as session:
        async def tokens(body):
            async with session.post(engine.url + COMPLETIONS, json=body) as resp:
                events = parse_sse(await resp.read())
            return [t for e in events[:-1] for c in e["choices"] for t in c["token_ids"]], events
        whole, events = await tokens({"prompt": "hello", "max_tokens": 9, "stream": True, "return_token_ids": True})
        rest, _ = await tokens({"prompt": prompt + whole[:4], "max_tokens": 5, "stream": True,
                                "return_token_ids": True})
    assert whole == unbroken(prompt, 9) and rest == whole[4:]
    assert events[0]["choices"][0]["prompt_token_ids"] == prompt and events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length" and events[-2]["system_fingerprint"] == FINGERPRINT


# -- 1, 2: a replica that fails mid-answer -------------------------------------------------------

@pytest.mark.parametrize("route,usage,kind", [(COMPLETIONS, True, "close"), (COMPLETIONS, False, "close"),
                                              (CHAT, True, "close"), (CHAT, False, "close"),
                                              (COMPLETIONS, True, "rst"), (CHAT, True, "rst")])
async def test_a_stream_cut_mid_answer_continues_on_another_replica_unbroken(cluster, route, usage, kind):
    k, max_tokens = 5, 12
    cluster.plan = first_request_breaks(kind, k)
    await cluster.add("r0")
    await cluster.add("r1")
    body, prompt_ids = request_body(route, "the cluster node head", max_tokens, usage=usage)
    with capture_logs() as logs:
        async with gateway(cluster) as gw:
            reply = await ask(gw, route, body)
            await until(lambda: any(e["event"] == "request" for e in logs))
            assert reply.status == 200
            assert_one_unbroken_stream(reply.events, route == CHAT, prompt_ids, max_tokens, usage)
            # Event for event, the stream of an answer nothing broke.
            assert same_events(reply.events) == same_events(await unbroken_events(route, body))
            (first, first_route, _), (second, second_route, continuation) = cluster.seen
            assert first != second and first_route == route and second_route == COMPLETIONS
            # The remainder: prompt and generated ids, what is left to make.
            assert continuation["prompt"] == prompt_ids + unbroken(prompt_ids, k)
            assert continuation["max_tokens"] == max_tokens - k and continuation["stream"] is True
            assert dict(gw.continuations) == {"disconnect": 1} and not gw.failed
            assert gw.pool.replicas[first].unhealthy is not None and gw.pool.replicas[second].unhealthy is None
            assert gw.failure().startswith(f"{first} is unhealthy")
            assert gw.replica_load()[first]["continued_away"] == 1
    continued = [e for e in logs if e["event"] == "continued"]
    assert len(continued) == 1, continued
    assert continued[0]["from_replica"] == first and continued[0]["to_replica"] == second
    assert continued[0]["tokens_replayed"] == k and continued[0]["reason"] == "disconnect"
    assert isinstance(continued[0]["gap_ms"], float) and 0 <= continued[0]["gap_ms"] < 2000
    request = next(e for e in logs if e["event"] == "request")
    assert request["status"] == 200 and request["continued"] == 1 and request["completion_tokens"] == max_tokens


@pytest.mark.parametrize("route", [COMPLETIONS, CHAT])
async def test_a_json_answer_cut_mid_answer_is_built_from_two_replicas(cluster, route):
    k, max_tokens = 4, 10
    cluster.plan = first_request_breaks("close", k)
    await cluster.add("r0")
    await cluster.add("r1")
    body, prompt_ids = request_body(route, "drain join health", max_tokens, stream=False)
    with capture_logs() as logs:
        async with gateway(cluster) as gw:
            reply = await ask(gw, route, body)
            await until(lambda: any(e["event"] == "request" for e in logs))
            assert reply.status == 200 and reply.body is not None, reply
            answer = reply.body
            assert answer["object"] == ("chat.completion" if route == CHAT else "text_completion")
            assert answer["id"].startswith("chatcmpl-" if route == CHAT else "cmpl-") and answer["model"] == MODEL
            (choice,) = answer["choices"]
            text = choice["message"]["content"] if route == CHAT else choice["text"]
            assert text == unbroken_text(prompt_ids, max_tokens)
            assert choice["finish_reason"] == "length"
            assert answer["usage"] == {"prompt_tokens": len(prompt_ids), "total_tokens": len(prompt_ids) + max_tokens,
                                       "completion_tokens": max_tokens}
            assert len(cluster.seen) == 2 and cluster.seen[1][2]["prompt"] == prompt_ids + unbroken(prompt_ids, k)
            assert dict(gw.continuations) == {"disconnect": 1}
            assert gw.pool.replicas[cluster.seen[0][0]].unhealthy is not None
    continued = [e for e in logs if e["event"] == "continued"]
    assert len(continued) == 1 and continued[0]["tokens_replayed"] == k, continued
    assert continued[0]["from_replica"] == cluster.seen[0][0] and continued[0]["to_replica"] == cluster.seen[1][0]


async def test_a_stream_cut_after_its_last_token_gets_its_usage_and_done_without_a_continuation(cluster):
    max_tokens = 6
    cluster.plan = first_request_breaks("close", max_tokens)  # every token sent, then no usage, no [DONE]
    await cluster.add("r0")
    await cluster.add("r1")
    body, prompt_ids = request_body(COMPLETIONS, "answer", max_tokens, usage=True)
    async with gateway(cluster) as gw:
        reply = await ask(gw, COMPLETIONS, body)
        assert reply.status == 200
        assert_one_unbroken_stream(reply.events, False, prompt_ids, max_tokens, usage=True)
        assert len(cluster.seen) == 1 and not gw.continuations and not gw.failed


async def test_a_continuation_that_fails_in_turn_is_continued_again(cluster):
    # The first replica is drained (not its fault), the second resets: a third finishes.
    cluster.plan = lambda seq, name, ids, body: {0: Fault("hang", 3), 1: Fault("close", 4)}.get(seq)
    for name in ("r0", "r1", "r2"):
        await cluster.add(name)
    body, prompt_ids = request_body(CHAT, "stream answer", 14, usage=True)
    async with gateway(cluster) as gw:
        task = asyncio.ensure_future(ask(gw, CHAT, body))
        await until(lambda: cluster.engines[cluster.seen[0][0]].generation_tokens == 3 if cluster.seen else False)
        await asyncio.sleep(0.05)
        assert gw.evacuate(cluster.seen[0][0], "drain") == 1
        reply = await task
        assert reply.status == 200
        assert_one_unbroken_stream(reply.events, True, prompt_ids, 14, usage=True)
        assert len({name for name, _, _ in cluster.seen}) == 3
        assert cluster.seen[2][2]["prompt"] == prompt_ids + unbroken(prompt_ids, 7)
        assert dict(gw.continuations) == {"drain": 1, "disconnect": 1}


# -- 3, 4, 5: when the gateway does not continue ---------------------------------------------------

async def test_a_query_of_death_is_not_sent_to_a_third_replica(cluster):
    poison = tokenize("poison pill")
    cluster.plan = lambda seq, name, ids, body: Fault("close", 2) if ids[:len(poison)] == poison else None
    for name in ("r0", "r1", "r2"):
        await cluster.add(name)
    body, prompt_ids = request_body(COMPLETIONS, "poison pill", 10, usage=True)
    with capture_logs() as logs:
        async with gateway(cluster) as gw:
            reply = await ask(gw, COMPLETIONS, body)
            assert reply.status == 200  # the stream was under way
            (error,) = errors(reply.events)
            assert "failed on 2 replicas" in error["message"] and error["code"] == "replica_failed", error
            assert [e for e in reply.events if e != "[DONE]"][-1] == {"error": error}, "the error ends the stream"
            assert stream_text(reply.events, False) == unbroken_text(prompt_ids, 4)  # 2 tokens from each
            failed_on = [name for name, _, _ in cluster.seen]
            assert len(failed_on) == 2 and len(set(failed_on)) == 2, cluster.seen
            (third,) = set(cluster.engines) - set(failed_on)
            assert cluster.asked(third) == []
            assert all(n in error["message"] for n in failed_on)
            assert dict(gw.failed) == {"query_of_death": 1} and dict(gw.continuations) == {"disconnect": 1}
    (suspected,) = [e for e in logs if e["event"] == "suspected_query_of_death"]
    assert suspected["replicas"] == failed_on


async def test_no_continuation_is_allowed_the_cut_ends_the_stream_with_an_error(cluster):
    cluster.plan = first_request_breaks("close", 3)
    await cluster.add("r0")
    await cluster.add("r1")
    body, prompt_ids = request_body(COMPLETIONS, "the head", 10)
    with capture_logs() as logs:
        async with gateway(cluster, max_continuations=0) as gw:
            reply = await ask(gw, COMPLETIONS, body)
            assert reply.status == 200
            (error,) = errors(reply.events)
            assert "--max-continuations" in error["message"], error
            assert stream_text(reply.events, False) == unbroken_text(prompt_ids, 3)
            assert len(cluster.seen) == 1
            assert dict(gw.failed) == {"continuations_exhausted": 1} and not gw.continuations
    (failed,) = [e for e in logs if e["event"] == "request_failed"]
    assert failed["cause"] == "continuations_exhausted"


@pytest.mark.parametrize("extra,why", [({"stop": ["x"]}, "it has stop strings"),
                                       ({"n": 2}, "it asks for several choices")])
async def test_a_request_that_cannot_be_continued_ends_with_an_error_that_says_why(cluster, extra, why):
    cluster.plan = first_request_breaks("close", 3)
    await cluster.add("r0")
    await cluster.add("r1")
    body, prompt_ids = request_body(COMPLETIONS, "the head", 10, **extra)
    async with gateway(cluster) as gw:
        reply = await ask(gw, COMPLETIONS, body)
        assert reply.status == 200
        (error,) = errors(reply.events)
        assert "could not be continued" in error["message"] and why in error["message"], error
        assert stream_text(reply.events, False) == unbroken_text(prompt_ids, 3)
        assert len(cluster.seen) == 1
        assert dict(gw.failed) == {"not_continuable": 1} and not gw.continuations
        assert gw.pool.replicas[cluster.seen[0][0]].unhealthy is not None


# -- 6: a replica that accepts no connection -----------------------------------------------------

@contextlib.contextmanager
def unanswering_address():
    """A loopback address whose kernel drops SYNs: a listener with backlog 0 (one
    queued connection) whose queue is filled and never accepted."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    try:
        for _ in range(2):
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.01)
        probe = socket.socket()
        probe.settimeout(0.2)
        try:
            probe.connect(("127.0.0.1", port))
            answered = True
        except (TimeoutError, OSError):
            answered = False
        finally:
            probe.close()
        if answered:
            pytest.skip("this kernel answers SYNs on a full accept queue: no loopback address that drops them")
        yield f"http://127.0.0.1:{port}"
    finally:
        for s in fillers:
            s.close()
        server.close()


async def test_a_replica_that_accepts_no_connection_is_marked_and_requests_go_elsewhere(cluster):
    await cluster.add("good", token_delay=0.03)  # 8 tokens: ~0.2 s, so concurrent requests split
    body, prompt_ids = request_body(COMPLETIONS, "latency", 8)
    with unanswering_address() as dead_url:
        async with gateway(cluster) as gw:
            gw.update_replicas([*cluster.statuses(), ReplicaStatus("dead", None, dead_url, ReplicaState.READY)])
            started = time.perf_counter()
            replies = await asyncio.gather(*(ask(gw, COMPLETIONS, body) for _ in range(4)))
            elapsed = time.perf_counter() - started
            for reply in replies:
                assert reply.status == 200 and reply.headers["X-Replica-Id"] == "good"
                assert_one_unbroken_stream(reply.events, False, prompt_ids, 8, usage=False)
            assert gw.pool.replicas["dead"].failed >= 1, "the least-loaded pick sent some there first"
            assert "ConnectionTimeoutError" in gw.pool.replicas["dead"].unhealthy
            assert gw.pool.replicas["good"].unhealthy is None
            assert elapsed < 3.0, elapsed  # one connect timeout (CONNECT_TIMEOUT_S), then the good replica
            assert len(cluster.seen) == 4 and not gw.continuations and not gw.failed


# -- 7: stalls ----------------------------------------------------------------------------------
# The stall constants are the gateway's own (a 1 s floor, a 0.5 s confirmation):
# a stall is confirmed within about 2 s, fast enough as they are.

async def test_a_replica_that_hangs_mid_stream_is_marked_stalled_and_the_stream_moves(cluster):
    cluster.plan = first_request_breaks("hang", 4)
    await cluster.add("r0", token_delay=0.01)
    await cluster.add("r1", token_delay=0.01)
    body, prompt_ids = request_body(CHAT, "the engine", 12, usage=True)
    with capture_logs() as logs:
        async with gateway(cluster) as gw:
            started = time.perf_counter()
            reply = await ask(gw, CHAT, body)
            elapsed = time.perf_counter() - started
            assert reply.status == 200
            assert_one_unbroken_stream(reply.events, True, prompt_ids, 12, usage=True)
            hung, other = cluster.seen[0][0], cluster.seen[1][0]
            assert hung != other and len(cluster.seen) == 2
            assert gw.stalls == 1 and gw.stalled() is not None and gw.stalled().startswith(f"{hung} stalled")
            assert gw.pool.replicas[hung].stalled and gw.replica_load()[hung]["stalls"] == 1
            assert gw.pool.replicas[other].unhealthy is None
            assert dict(gw.continuations) == {"stall": 1} and not gw.failed
            assert elapsed < 4.0, elapsed
    (stalled,) = [e for e in logs if e["event"] == "replica_stalled"]
    assert stalled["replica_id"] == hung and stalled["moved"] == 1
    (continued,) = [e for e in logs if e["event"] == "continued"]
    assert continued["reason"] == "stall" and continued["tokens_replayed"] == 4


async def test_a_slow_replica_whose_engine_makes_tokens_is_not_marked_stalled(cluster):
    # Silent to the gateway for 2 s (twice the 1 s floor) while its engine's counter grows.
    cluster.plan = lambda seq, name, ids, body: Fault("pause", 4, pause_s=2.0) if seq == 0 else None
    await cluster.add("r0", token_delay=0.01)
    await cluster.add("r1", token_delay=0.01)
    body, prompt_ids = request_body(COMPLETIONS, "busy", 10, usage=True)
    async with gateway(cluster) as gw:
        reply = await ask(gw, COMPLETIONS, body)
        assert reply.status == 200
        assert_one_unbroken_stream(reply.events, False, prompt_ids, 10, usage=True)
        assert gw.counts["stall_suspicions_cleared"] >= 1, "its silence was suspected, then cleared"
        assert gw.stalls == 0 and gw.stalled() is None and gw.failure() is None
        assert len(cluster.seen) == 1 and not gw.continuations


async def test_a_request_whose_response_never_began_can_still_be_moved(cluster):
    # Its engine took the request and sends nothing (frozen, or in a long prefill): a
    # drain deadline (or a stall found from other requests) must still move it.
    cluster.plan = first_request_breaks("hang_before_headers", 0)
    await cluster.add("r0", token_delay=0.01)
    await cluster.add("r1", token_delay=0.01)
    body, prompt_ids = request_body(COMPLETIONS, "frozen", 8, usage=True)
    async with gateway(cluster) as gw:
        task = asyncio.create_task(ask(gw, COMPLETIONS, body, timeout=5.0))
        while not cluster.seen:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        frozen = cluster.seen[0][0]
        assert gw.evacuate(frozen, "drain") == 1
        reply = await task
        assert reply.status == 200
        assert_one_unbroken_stream(reply.events, False, prompt_ids, 8, usage=True)
        # Nothing had reached the client: the request itself goes to the other replica.
        assert len(cluster.seen) == 2 and cluster.seen[1][0] != frozen and cluster.seen[1][2] == cluster.seen[0][2]
        assert dict(gw.continuations) == {"drain": 1} and not gw.failed


@pytest.mark.parametrize("kind", ["hang_before_headers", "freeze_before_headers"])
async def test_a_new_engines_slow_first_token_is_not_called_a_stall(cluster, kind):
    """Before its first token a request may be in a long prefill, which vLLM's
    counters show only at its end, on an engine that may answer /metrics slowly
    (just started, under a burst): with no first token learned yet, the replica
    gets 5 s before it is even suspected."""
    cluster.plan = first_request_breaks(kind, 0)
    await cluster.add("r0", token_delay=0.01)
    await cluster.add("r1", token_delay=0.01)
    body, _ = request_body(COMPLETIONS, "long prefill", 8, usage=True)
    async with gateway(cluster) as gw:
        task = asyncio.create_task(ask(gw, COMPLETIONS, body, timeout=10.0))
        await asyncio.sleep(3.0)  # past the 1 s floor and a confirmation, several times
        assert gw.stalls == 0 and not gw.continuations
        assert not task.done()  # still waiting for its first token, on its replica
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_replica_that_stops_giving_first_tokens_is_marked_stalled_from_its_own_record(cluster):
    """Short answers leave no request mid-answer at a freeze: a replica whose new
    requests wait past twice its own recent times to a first token, its counters
    still, is stalled; the request moves."""
    await cluster.add("r0", token_delay=0.005)
    await cluster.add("r1", token_delay=0.005)
    body, prompt_ids = request_body(COMPLETIONS, "short", 3, usage=True)
    async with gateway(cluster) as gw:
        for _ in range(6):  # both replicas learn their times to a first token
            assert (await ask(gw, COMPLETIONS, body)).status == 200
        seq = len(cluster.seen)
        cluster.plan = lambda s, name, ids, b: Fault("hang_before_headers", 0) if s == seq else None
        started = time.perf_counter()
        reply = await ask(gw, COMPLETIONS, body, timeout=5.0)
        elapsed = time.perf_counter() - started
        assert reply.status == 200
        assert_one_unbroken_stream(reply.events, False, prompt_ids, 3, usage=True)
        frozen = cluster.seen[seq][0]
        assert gw.stalls == 1 and gw.pool.replicas[frozen].stalled and dict(gw.continuations) == {"stall": 1}
        assert elapsed < 3.0, elapsed


# -- 8: drain --------------------------------------------------------------------------------------

async def test_a_drained_replica_hands_its_stream_over_and_is_not_marked(cluster):
    await cluster.add("r0", token_delay=0.02)
    await cluster.add("r1", token_delay=0.02)
    body, prompt_ids = request_body(CHAT, "drain join", 20, usage=True)
    raw = b""
    with capture_logs() as logs:
        async with gateway(cluster) as gw:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)) as session:
                async with session.post(gw_url(gw, CHAT), json=body) as resp:
                    drained = resp.headers["X-Replica-Id"]
                    async for chunk in resp.content.iter_any():
                        raw += chunk
                        whole = raw[:raw.rfind(b"\n\n") + 2] if b"\n\n" in raw else b""  # complete events
                        if stream_text(parse_sse(whole), True).count(" w") >= 5:
                            break
                    assert len(cluster.seen) == 1, "still on its first replica"
                    assert gw.evacuate(drained, "drain") == 1
                    raw += await resp.read()
            assert_one_unbroken_stream(parse_sse(raw), True, prompt_ids, 20, usage=True)
            (first, _, _), (second, route, continuation) = cluster.seen
            assert first == drained and second != drained and route == COMPLETIONS
            assert continuation["prompt"][:len(prompt_ids)] == prompt_ids
            assert dict(gw.continuations) == {"drain": 1} and not gw.failed
            assert gw.pool.replicas[drained].unhealthy is None and gw.failure() is None
            assert gw.replica_load()[drained]["continued_away"] == 1
    (continued,) = [e for e in logs if e["event"] == "continued"]
    assert continued["reason"] == "drain" and continued["from_replica"] == drained
    assert not [e for e in logs if e["event"] == "replica_marked_unhealthy"]


# -- a JSON answer built from an engine's stream -----------------------------------------------------

async def test_a_json_answer_with_several_choices_keeps_them_apart(cluster):
    """Nothing fails here: a client that asked for n=2 and no stream gets two choices,
    as vLLM answers it, not one choice with both choices' tokens interleaved."""
    await cluster.add("r0")
    body, prompt_ids = request_body(COMPLETIONS, "two", 3, stream=False, n=2)
    async with gateway(cluster) as gw:
        reply = await ask(gw, COMPLETIONS, body)
    assert reply.status == 200
    choices = reply.body["choices"]
    assert [c["index"] for c in choices] == [0, 1], choices
    assert all(c["text"] == unbroken_text(prompt_ids, 3) and c["finish_reason"] == "length" for c in choices)
    assert reply.body["usage"]["completion_tokens"] == 6
