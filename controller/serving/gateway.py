"""The gateway: the head's OpenAI-compatible front (`--serve-port`).

Requests are checked here (API key, route, content type, size, JSON) and
passed to a replica picked by `controller/balancer.py`, body and stream
untouched: streamed tokens are relayed chunk by chunk as they arrive (a
stream's `request` log event says how: the chunks read from the replica and
how long the gateway held them before writing them on). A
replica that refuses or resets the connection before any response byte is
marked unhealthy at once (and the loop told) and the request is retried on
another; a stream whose replica dies ends with an error event. Between
requests, every replica's /health is watched the same way. In DRAINING new
requests get 503 while the in-flight ones finish.

Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections import Counter
from typing import Any, Callable

import aiohttp
from aiohttp import web

from controller.cluster.records import ReplicaStatus
from controller.serving.balancer import Pool, Replica
from controller.logs import log
from controller.surface.metrics import Metrics

POST_ROUTES = ("/v1/completions", "/v1/chat/completions")
RETRY_AFTER_S = "1"
REPLICA_KEEPALIVE_S = 4.0
STREAM_TAIL_BYTES = 4096
# A stream chunk the gateway held longer than this between reading it from the
# replica and writing it to the client counts as a slow relay, logged as
# relays_over_10ms (a write to a local socket takes microseconds; on a loaded
# 2-core machine 4224 chunks were held 0.07 ms at the median, 10 ms at most:
# beyond that the gateway was preempted, or something holds chunks back).
SLOW_RELAY_S = 0.010
# Failures of a replica connection that happen before any response byte: the
# request never reached an engine that answered, so it is safe to send elsewhere.
NOTHING_RECEIVED = (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


def error_response(status: int, message: str, kind: str, code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers)


def sse_error(message: str, code: str) -> bytes:
    event = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    """Write the last words of a stream; a client that already left is no error."""
    try:
        await response.write(data)
        await response.write_eof()
    except (ConnectionResetError, RuntimeError):
        pass


class Gateway:
    def __init__(self, host: str, port: int, *, api_key: str | None = None, max_body_bytes: int = 4 * 2**20,
                 request_timeout: float = 600.0, max_in_flight: int = 64,
                 on_unhealthy: Callable[[str, float], None] | None = None, liveness_interval: float = 0.5,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        # The node's clock: a replica's last good answer is the first sign of its
        # failure, compared with the board's times (durations use perf_counter).
        self.clock = clock
        self.port = port
        self._api_key = api_key.encode() if api_key else None
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.pool = Pool(max_in_flight=max_in_flight)
        self.on_unhealthy = on_unhealthy
        self.liveness_interval = liveness_interval
        self.metrics = metrics
        self.draining = False
        self.in_flight = 0
        self.counts: Counter[str] = Counter()
        # Set and replaced whenever load or the pool changes: waiters hold the old one.
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._watch: asyncio.Task | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def app(self) -> web.Application:
        # The body limit is ours to answer (413 with an OpenAI error), so aiohttp's
        # own limit sits just above it.
        app = web.Application(client_max_size=self.max_body_bytes + 1, middlewares=[self._errors])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        for route in POST_ROUTES:
            app.router.add_post(route, self.generate)
        return app

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # Idle connections are closed before the engine's server closes them
            # (uvicorn: 5 s), so a pooled connection is not reset under a request.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=REPLICA_KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        try:
            await site.start()
        except OSError as exc:
            await self.stop()
            raise OSError(f"serve port {self.host}:{self.port} is not available: {exc.strerror or exc}") from None
        self._watch = asyncio.get_running_loop().create_task(self._watch_replicas())
        log.info("gateway_listening", host=self.host, port=self.port, api_key=bool(self._api_key))

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def start_draining(self) -> None:
        if not self.draining:
            self.draining = True
            log.info("gateway_draining", in_flight=self.in_flight)

    async def wait_idle(self, timeout: float) -> int:
        """Wait for the in-flight requests to finish; returns how many did not in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_flight and loop.time() < deadline:
            try:
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
        log.info("gateway_drained", unfinished=self.in_flight)
        return self.in_flight

    # -- the supervisors' view and the gateway's own -------------------------------------

    def update_replicas(self, statuses: list[ReplicaStatus]) -> None:
        self.pool.update(statuses)
        self._notify()

    def retire(self, replica_id: str) -> int | None:
        """Its node drains: no new requests; returns those still in flight (None: unknown here)."""
        return self.pool.retire(replica_id)

    def can_serve(self) -> bool:
        return not self.draining and bool(self.pool.available())

    def failure(self) -> str | None:
        """Why the gateway holds a replica as unhealthy, if it does."""
        marked = self.pool.marked()
        return f"{marked[0].replica_id} is unhealthy: {marked[0].unhealthy}" if marked else None

    def replica_load(self) -> dict[str, dict[str, int]]:
        """Per replica: requests in flight now, answered, and failed connections."""
        return {r.replica_id: {"in_flight": r.in_flight, "requests": r.served, "failed": r.failed}
                for r in self.pool.replicas.values()}

    def _mark(self, replica: Replica, reason: str) -> None:
        if self.pool.mark_unhealthy(replica.replica_id, reason):
            self.counts["replicas_marked_unhealthy"] += 1
            log.warning("replica_marked_unhealthy", replica_id=replica.replica_id, reason=reason)
            if self.on_unhealthy is not None:
                # The failure began after the replica's last good answer.
                since = replica.last_ok if replica.last_ok is not None else self.clock()
                self.on_unhealthy(f"{replica.replica_id} is unhealthy: {reason}", since)

    async def _watch_replicas(self) -> None:
        """Every replica's /health, twice a second over a kept-alive connection.

        A ready replica that refuses or resets the connection is marked at once,
        so a dead engine (or a killed node) is seen within one interval even when
        no request is going to it. A slow answer marks nothing: a busy machine is
        not a dead one (Ray's node checks and the generation probe see hangs).
        A marked replica comes back once its supervisor says READY and /health
        answers 200.
        """
        while True:
            await asyncio.sleep(self.liveness_interval)
            if self.draining:
                continue  # the engines are being stopped on purpose: not a failure to report
            await asyncio.gather(*(self._check_replica(r) for r in list(self.pool.replicas.values())
                                   if r.ready and not r.retiring))

    async def _check_replica(self, r: Replica) -> None:
        try:
            async with self._session.get(r.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                healthy = resp.status == 200
        except NOTHING_RECEIVED as exc:
            self._mark(r, f"health check: {type(exc).__name__}: {exc}"[:300])
            return
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return
        if healthy:
            r.last_ok = self.clock()
        if healthy and r.unhealthy is not None and self.pool.replicas.get(r.replica_id) is r:
            self.pool.clear(r.replica_id)
            log.info("replica_cleared", replica_id=r.replica_id)
            self._notify()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- checks common to every route ------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        if request.path != "/health" and self._api_key is not None and not self._authorized(request):
            self.counts["unauthorized"] += 1
            return error_response(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                  "invalid_request_error", "invalid_api_key")
        try:
            return await handler(request)
        except web.HTTPNotFound:
            return error_response(404, f"no route {request.method} {request.path}", "invalid_request_error",
                                  "unknown_route")
        except web.HTTPMethodNotAllowed:
            return error_response(405, f"{request.method} is not allowed on {request.path}",
                                  "invalid_request_error", "method_not_allowed")

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        # Constant time: compare_digest on equal-type bytes, whatever the length.
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._api_key or b"")

    async def _read_json(self, request: web.Request) -> tuple[bytes | None, web.Response | None]:
        if request.content_type != "application/json":
            return None, error_response(415, f"content type must be application/json, got "
                                        f"{request.content_type or 'none'}", "invalid_request_error",
                                        "unsupported_media_type")
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return None, self._too_large()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return None, self._too_large()
        if len(body) > self.max_body_bytes:
            return None, self._too_large()
        try:
            parsed = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            return None, error_response(400, f"the body is not valid JSON: {exc}", "invalid_request_error",
                                        "invalid_json")
        if not isinstance(parsed, dict):
            return None, error_response(400, "the body must be a JSON object", "invalid_request_error",
                                        "invalid_json")
        return body, None

    def _too_large(self) -> web.Response:
        return error_response(413, f"the body is larger than {self.max_body_bytes} bytes",
                              "invalid_request_error", "body_too_large")

    # -- routes ----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        ready = self.can_serve()
        return web.json_response({"ready": ready, "draining": self.draining,
                                  "replicas": len(self.pool.available())}, status=200 if ready else 503)

    async def models(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, None)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        if self.draining:  # answered before the body is read and parsed
            return self._unavailable("the cluster is draining")
        body, problem = await self._read_json(request)
        if problem is not None:
            self.counts["bad_request"] += 1
            return problem
        return await self._serve(request, body)

    def _unavailable(self, why: str) -> web.Response:
        self.counts["unavailable"] += 1
        return error_response(503, f"no replica can serve: {why}", "server_error", "unavailable",
                              headers={"Retry-After": RETRY_AFTER_S})

    # -- passing a request to a replica ------------------------------------------------------

    async def _serve(self, request: web.Request, body: bytes | None) -> web.StreamResponse:
        if self.draining:
            return self._unavailable("the cluster is draining")
        started = time.perf_counter()
        self.in_flight += 1
        streaming: dict[str, Any] = {}  # set once a stream's headers went out
        try:
            async with asyncio.timeout(self.request_timeout):
                response, replica, attempts, tokens = await self._forward(request, body, streaming)
        except TimeoutError:
            self.counts["timeouts"] += 1
            message = f"no answer within {self.request_timeout:g}s"
            replica, attempts, tokens = None, 0, None
            if "response" in streaming:  # too late for a status code: end the stream with an error event
                response = streaming["response"]
                await _write_quietly(response, sse_error(message, "timeout"))
            else:
                response = error_response(504, message, "server_error", "timeout")
        except asyncio.CancelledError:
            # The client closed its connection (aiohttp cancels the handler); the
            # replica's stream is released on the way out. A client that had the whole
            # stream and hung up before the final empty chunk was served in full.
            elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
            if streaming.get("complete"):
                self.counts["status_200"] += 1
                log.info("request", route=request.path, replica_id=streaming.get("replica_id"), status=200,
                         attempts=1, latency_ms=elapsed_ms, completion_tokens=streaming.get("tokens"),
                         **_relay_fields(streaming))
            else:
                self.counts["clients_gone"] += 1
                log.info("request", route=request.path, replica_id=streaming.get("replica_id"), status=499,
                         attempts=0, latency_ms=elapsed_ms, completion_tokens=None,
                         reason="the client closed the connection", **_relay_fields(streaming))
            raise
        finally:
            self.in_flight -= 1
            self._notify()
        self.counts[f"status_{response.status}"] += 1
        elapsed = time.perf_counter() - started
        if self.metrics is not None:
            first = streaming.get("first_chunk_at")
            self.metrics.observe_request(request.path, response.status, elapsed,
                                         None if first is None else first - started)
        log.info("request", route=request.path, replica_id=replica, status=response.status, attempts=attempts,
                 latency_ms=round(elapsed * 1000, 2), completion_tokens=tokens, **_relay_fields(streaming))
        return response

    async def _forward(self, request: web.Request, body: bytes | None, streaming: dict[str, Any]
                       ) -> tuple[web.StreamResponse, str | None, int, int | None]:
        tried: set[str] = set()
        while True:
            replica = await self._acquire(tried)
            if replica is None:
                why = "every replica failed this request" if tried else "no replica is ready"
                return self._unavailable(why), None, len(tried), None
            tried.add(replica.replica_id)
            replica.in_flight += 1
            try:
                upstream = await self._session.request(
                    request.method, replica.url + request.path, data=body,
                    headers={"Content-Type": "application/json"} if body is not None else None)
            except NOTHING_RECEIVED as exc:
                replica.in_flight -= 1
                replica.failed += 1
                self.counts["retries"] += 1
                self._mark(replica, f"{type(exc).__name__}: {exc}"[:300])
                continue
            except BaseException:
                replica.in_flight -= 1
                raise
            try:
                response, tokens = await self._relay(request, upstream, replica, streaming)
            finally:
                upstream.release()
                replica.in_flight -= 1
            replica.served += 1
            replica.last_ok = self.clock()
            return response, replica.replica_id, len(tried), tokens

    async def _acquire(self, tried: set[str]) -> Replica | None:
        """The replica for the next attempt; waits (queues) while every one is at its limit."""
        while True:
            replica = self.pool.pick(exclude=tried)
            if replica is not None or not self.pool.has_capacity_somewhere(exclude=tried):
                return replica
            self.counts["queued"] += 1
            await self._changed.wait()

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse, replica: Replica,
                     streaming: dict[str, Any]) -> tuple[web.StreamResponse, int | None]:
        headers = {"Content-Type": upstream.headers.get("Content-Type", "application/json"),
                   "X-Replica-Id": replica.replica_id}
        if not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
            try:
                data = await upstream.read()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self._mark(replica, f"failed mid-response: {type(exc).__name__}")
                return error_response(502, f"{replica.replica_id} failed mid-response: {type(exc).__name__}",
                                      "server_error", "replica_failed"), None
            return web.Response(status=upstream.status, body=data, headers=headers), _completion_tokens(data)
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        streaming["response"], streaming["replica_id"] = response, replica.replica_id
        chunks = upstream.content.iter_any()
        tail = b""  # the stream's end, where a usage chunk (stream_options.include_usage) sits
        relay = streaming["relay"] = RelayFigures()
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                # The replica died mid-stream: the client gets a clear error event, not a hang.
                self.counts["streams_broken"] += 1
                self._mark(replica, f"failed mid-stream: {type(exc).__name__}")
                await _write_quietly(response, sse_error(
                    f"{replica.replica_id} failed mid-stream: {type(exc).__name__}", "replica_failed"))
                return response, None
            read_at = time.perf_counter()
            tail = (tail + chunk)[-STREAM_TAIL_BYTES:]
            try:
                await response.write(chunk)
                written_at = time.perf_counter()
                relay.add(read_at, written_at)
                streaming.setdefault("first_chunk_at", written_at)
                if tail.rstrip().endswith(b"data: [DONE]"):
                    # The client has the whole answer; it may hang up before the stream's
                    # own end (the OpenAI SDK does): that is a request served.
                    streaming["complete"], streaming["tokens"] = True, _stream_tokens(tail)
            except ConnectionResetError:
                # The client left; release() closes the replica's stream. Not the replica's fault.
                self.counts["clients_gone"] += 1
                return response, None
        await response.write_eof()
        return response, _stream_tokens(tail)


class RelayFigures:
    """How one stream went through, for its `request` log event: the replica's
    chunks as the gateway read them (how many, first to last), and how long the
    gateway held each between reading it and having written it to the client.

    The hold is the gateway's own share of a token's delay; when the chunks came
    (or when a busy client read them) is the replica's and the machine's. On a
    loaded machine the engine may send many token events at once, and a
    descheduled client reads a backlog at once: the hold tells the gateway apart.
    """

    __slots__ = ("reads", "first_read", "last_read", "max_relay", "slow")

    def __init__(self) -> None:
        self.reads = 0
        self.first_read = self.last_read = 0.0
        self.max_relay = 0.0
        self.slow = 0

    def add(self, read_at: float, written_at: float) -> None:
        if not self.reads:
            self.first_read = read_at
        self.reads += 1
        self.last_read = read_at
        held = written_at - read_at
        self.max_relay = max(self.max_relay, held)
        self.slow += held > SLOW_RELAY_S

    def fields(self) -> dict[str, Any]:
        return {"upstream_reads": self.reads,
                "upstream_span_ms": round((self.last_read - self.first_read) * 1000, 2),
                "max_relay_ms": round(self.max_relay * 1000, 3),
                "relays_over_10ms": self.slow}


def _relay_fields(streaming: dict[str, Any]) -> dict[str, Any]:
    relay = streaming.get("relay")
    return relay.fields() if relay is not None else {}


def _stream_tokens(tail: bytes) -> int | None:
    """completion_tokens from a stream's usage event, when the client asked for one."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"completion_tokens"' in line:
            return _completion_tokens(line[6:])
    return None


def _completion_tokens(data: bytes) -> int | None:
    try:
        return json.loads(data)["usage"]["completion_tokens"]
    except (ValueError, KeyError, TypeError):
        return None
