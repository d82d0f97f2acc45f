"""The gateway: the head's OpenAI-compatible front (`--serve-port`).

Requests are checked here (API key, route, content type, size, JSON) and
passed to a replica picked by `controller/balancer.py`. Every completion is
read from its engine as a stream with token ids (`splice.py`), whatever the
client asked for: streamed tokens are relayed as they arrive, event by event
(a `request` log event says how: the reads from the replica and how long the
gateway held them), and a client that asked for one JSON answer gets it built
at the end.

A client never sees a replica fail:
- a replica that refuses the connection, or does not accept it within
  CONNECT_TIMEOUT_S, is marked unhealthy at once (and the loop told) and the
  request goes to another;
- an answer cut short (the connection reset or closed mid-answer, the replica
  stalled, its drain deadline passed) is continued on another replica from the
  tokens already made and spliced into the same response (`splice.py`), at most
  --max-continuations times and never past a second failing replica;
- a replica whose requests all make no progress for longer than its learned
  deadline (`stalls.py`) is suspected, confirmed stalled from its engine's own
  token counters, marked, and its requests continued elsewhere.
Between requests, every replica's /health is watched. In DRAINING new
requests get 503 while the in-flight ones finish.

Errors have OpenAI's shape: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
from aiohttp import web

from controller.cluster.records import ReplicaStatus
from controller.engines.engine_metrics import read_counters
from controller.serving.balancer import Pool, Replica
from controller.serving.outcomes import CONTINUATION_REASONS, FAILURE_CAUSES
from controller.serving.splice import DONE, EngineError, EventReader, Splice, why_not_continuable
from controller.logs import log
from controller.surface.metrics import Metrics

POST_ROUTES = ("/v1/completions", "/v1/chat/completions")
RETRY_AFTER_S = "1"
REPLICA_KEEPALIVE_S = 4.0
# A stream chunk the gateway held longer than this between reading it from the
# replica and writing it to the client counts as a slow relay, logged as
# relays_over_10ms (a write to a local socket takes microseconds; on a loaded
# 2-core machine 4224 chunks were held 0.07 ms at the median, 10 ms at most:
# beyond that the gateway was preempted, or something holds chunks back).
SLOW_RELAY_S = 0.010
# Failures of a replica connection before any response byte. A refused or
# timed-out connect: the request never reached the replica (a connect that times
# out is a machine that does not answer at all: power loss, partition), so it is
# sent elsewhere at once. A connection closed or reset after the request went out:
# the engine may have died of it, so it counts as a failure under that replica
# (the query-of-death rule) before it is sent elsewhere.
NOT_CONNECTED = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
NOTHING_RECEIVED = (*NOT_CONNECTED, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)
# A loopback or LAN connect takes well under a millisecond; a live machine's kernel
# answers a SYN at once, however busy its processes are. But this process's own
# event loop may stall (over a second seen on a loaded 2-core head), and a timer
# that fires late fires wrongly: 2 s leaves room for that.
CONNECT_TIMEOUT_S = 2.0
# How long a request waits for a marked, still READY replica to be cleared when
# it has no other (rather than a 503 at once).
MARKED_WAIT_S = 5.0
# A request that failed under this many replicas is not sent to another: it may be
# what brings them down (a query of death).
QUERY_OF_DEATH_FAILURES = 2
# The stall watch: how often it looks, how long at least it waits between two
# readings of a suspect's counters (longer when the replica's own gaps are), and how
# long one reading may take. (Shorter than the supervisor's reading: here a frozen
# machine must be told within seconds; the counters are confirmation, not the sign.)
STALL_WATCH_S = 0.25
STALL_CONFIRM_S = 0.5
STALL_COUNTERS_TIMEOUT_S = 1.0
# A stalled replica answers a one-token request within this before it is cleared.
STALL_CLEAR_PROBE_S = 2.0


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
                 request_timeout: float = 600.0, max_in_flight: int = 64, max_continuations: int = 2,
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
        self.max_continuations = max_continuations
        self.pool = Pool(max_in_flight=max_in_flight)
        self.on_unhealthy = on_unhealthy
        self.liveness_interval = liveness_interval
        self.metrics = metrics
        self.draining = False
        self.in_flight = 0
        self.counts: Counter[str] = Counter()
        self.continuations: Counter[str] = Counter()  # by reason: disconnect, stall, drain
        self.failed: Counter[str] = Counter()          # requests the gateway failed, by cause
        self.stalls = 0
        # Set and replaced whenever load or the pool changes: waiters hold the old one.
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._watch: asyncio.Task | None = None
        self._stall_watch: asyncio.Task | None = None
        self._checks: dict[str, asyncio.Task] = {}  # replica id -> its stall confirmation or clearing probe

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
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S),
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
        self._stall_watch = asyncio.get_running_loop().create_task(self._watch_stalls())
        log.info("gateway_listening", host=self.host, port=self.port, api_key=bool(self._api_key))

    async def stop(self) -> None:
        for task in (self._watch, self._stall_watch, *self._checks.values()):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
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

    def evacuate(self, replica_id: str, reason: str = "drain") -> int:
        """End every request's stay on this replica now; their answers continue on
        the others. Returns how many were moved."""
        r = self.pool.replicas.get(replica_id)
        return sum(f.interrupt(reason) for f in list(r.flights)) if r is not None else 0

    def failure(self) -> str | None:
        """Why the gateway holds a replica as unhealthy, if it does."""
        marked = self.pool.marked()
        return f"{marked[0].replica_id} is unhealthy: {marked[0].unhealthy}" if marked else None

    def stalled(self) -> str | None:
        """Why the gateway holds a replica as stalled, if it does."""
        stalled = [r for r in self.pool.marked() if r.stalled]
        return f"{stalled[0].replica_id} stalled: {stalled[0].unhealthy}" if stalled else None

    def replica_load(self) -> dict[str, dict[str, int]]:
        """Per replica: requests in flight now, answered, failed connections, requests
        continued elsewhere from it, and stalls."""
        return {r.replica_id: {"in_flight": r.in_flight, "requests": r.served, "failed": r.failed,
                               "continued_away": r.continued_away, "stalls": r.stalls}
                for r in self.pool.replicas.values()}

    def _mark(self, replica: Replica, reason: str, stalled: bool = False) -> None:
        if self.pool.mark_unhealthy(replica.replica_id, reason, stalled):
            self.counts["replicas_marked_unhealthy"] += 1
            log.warning("replica_marked_unhealthy", replica_id=replica.replica_id, reason=reason, stalled=stalled)
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
            replicas = [r for r in list(self.pool.replicas.values()) if r.ready and not r.retiring]
            for r in replicas:
                if r.stalled:  # its probe may take seconds: apart, not holding up the others' watch
                    self._check_apart(r, self._check_stalled)
            await asyncio.gather(*(self._check_replica(r) for r in replicas if not r.stalled))

    def _check_apart(self, r: Replica, check: Callable[[Replica], Any]) -> None:
        """Run one check of this replica in its own task, unless one runs already."""
        if r.replica_id not in self._checks:
            task = asyncio.get_running_loop().create_task(check(r))
            self._checks[r.replica_id] = task
            task.add_done_callback(lambda _: self._checks.pop(r.replica_id, None))

    async def _check_replica(self, r: Replica) -> None:
        try:
            # The connect bounded as a request's is: a machine that drops SYNs is marked.
            timeout = aiohttp.ClientTimeout(total=2, sock_connect=CONNECT_TIMEOUT_S)
            async with self._session.get(r.url + "/health", timeout=timeout) as resp:
                healthy = resp.status == 200
        except NOTHING_RECEIVED as exc:
            self._mark(r, f"health check: {type(exc).__name__}: {exc}"[:300])
            return
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return
        if healthy:
            r.last_ok = self.clock()
        if healthy and r.unhealthy is not None:
            self._clear(r)

    async def _check_stalled(self, r: Replica) -> None:
        """A stalled engine may still answer /health: it is cleared by an answer that
        needed it to make a token."""
        try:
            async with self._session.post(r.url + "/v1/completions", json={"prompt": [1], "max_tokens": 1},
                                          timeout=aiohttp.ClientTimeout(total=STALL_CLEAR_PROBE_S)) as resp:
                answered = resp.status == 200 and bool((await resp.json()).get("choices"))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            return
        if answered:
            r.last_ok = self.clock()
            self._clear(r, reason="it makes tokens again")

    def _clear(self, r: Replica, **why: str) -> None:
        """Lift a replica's mark, unless the pool has since replaced it (a new engine)."""
        if self.pool.replicas.get(r.replica_id) is r:
            self.pool.clear(r.replica_id)
            log.info("replica_cleared", replica_id=r.replica_id, **why)
            self._notify()

    async def _watch_stalls(self) -> None:
        """Every replica's token progress, four times a second: a silent one is
        suspected, then confirmed or not from its engine's own counters. A replica
        marked for another reason is watched too: requests may still hang on it."""
        while True:
            await asyncio.sleep(STALL_WATCH_S)
            now = time.perf_counter()
            for r in list(self.pool.replicas.values()):
                if not r.stalled and not r.writing and r.progress.suspicious(now, len(r.flights), _mid_answer(r)):
                    self._check_apart(r, self._confirm_stall)

    async def _confirm_stall(self, r: Replica) -> None:
        """Two readings of the engine's token counters, a confirmation window apart.
        Moving: the engine works (the gateway's view lagged). Still, or no answer at
        all (a frozen machine): the replica is stalled, and its requests move
        elsewhere. (While every request on it awaits its first token, vLLM's counters
        stand still through a prefill too: that suspicion came only past the
        replica's own learned time to a first token, or 5 s for a new engine.)"""
        silent = r.progress.silent_for(time.perf_counter())
        window = max(STALL_CONFIRM_S, r.progress.longest_gap())
        try:
            before = await read_counters(self._session, r.url, STALL_COUNTERS_TIMEOUT_S)
            await asyncio.sleep(window)
            after = await read_counters(self._session, r.url, STALL_COUNTERS_TIMEOUT_S)
            evidence = None if after.advanced_since(before) else (
                f"its engine's token counters did not move in {window:.1f}s ({after.running:g} requests running)")
        except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
            evidence = f"its engine's metrics do not answer ({type(exc).__name__})"
        except (aiohttp.ClientError, ValueError) as exc:  # no counters to read: nothing proven
            log.info("stall_unconfirmed", replica_id=r.replica_id, error=f"{type(exc).__name__}")
            evidence = None
        now = time.perf_counter()
        if evidence is None or not r.progress.suspicious(now, len(r.flights), _mid_answer(r)) or r.writing or \
                self.pool.replicas.get(r.replica_id) is not r:
            if evidence is None:
                r.progress.busy(now)  # it works, or cannot be judged: silence counts afresh
                self.counts["stall_suspicions_cleared"] += 1
            return
        r.stalls += 1
        self.stalls += 1
        reason = (f"no token for {silent:.1f}s with {len(r.flights)} requests in flight "
                  f"(deadline {r.progress.deadline(_mid_answer(r)):.1f}s); {evidence}")
        self._mark(r, reason, stalled=True)
        r.stalled = True  # also when it was marked already, for another reason
        moved = self.evacuate(r.replica_id, "stall")
        log.warning("replica_stalled", replica_id=r.replica_id, silent_s=round(silent, 2), moved=moved)

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

    async def _read_json(self, request: web.Request) -> tuple[dict[str, Any] | None, web.Response | None]:
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
        return parsed, None

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

    async def _serve(self, request: web.Request, body: dict[str, Any] | None) -> web.StreamResponse:
        if self.draining:
            return self._unavailable("the cluster is draining")
        started = time.perf_counter()
        self.in_flight += 1
        streaming: dict[str, Any] = {}  # set once a stream's headers went out
        try:
            async with asyncio.timeout(self.request_timeout):
                if body is None:
                    response, replica, attempts, tokens = await self._forward(request, streaming)
                else:
                    response, replica, attempts, tokens = await self._generate(request, body, streaming)
        except TimeoutError:
            self.counts["timeouts"] += 1
            self.failed["timeout"] += 1
            message = f"no answer within {self.request_timeout:g}s"
            replica, attempts, tokens = None, 0, None
            if "response" in streaming:  # too late for a status code: end the stream with an error event
                response = streaming["response"]
                await _write_quietly(response, sse_error(message, "timeout") + DONE)
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
        log.info("request", request_id=streaming.get("request_id"), route=request.path, replica_id=replica,
                 status=response.status, attempts=attempts,
                 latency_ms=round(elapsed * 1000, 2), completion_tokens=tokens, **_relay_fields(streaming),
                 **({"continued": streaming["continued"]} if streaming.get("continued") else {}))
        return response

    async def _forward(self, request: web.Request, streaming: dict[str, Any]
                       ) -> tuple[web.StreamResponse, str | None, int, int | None]:
        """A request without a body (GET /v1/models): passed on as it is."""
        tried: set[str] = set()
        while True:
            replica = await self._acquire(tried)
            if replica is None:
                why = "every replica failed this request" if tried else "no replica is ready"
                return self._unavailable(why), None, len(tried), None
            tried.add(replica.replica_id)
            replica.in_flight += 1
            try:
                async with self._session.request(request.method, replica.url + request.path) as upstream:
                    data = await upstream.read()
                    headers = {"Content-Type": upstream.headers.get("Content-Type", "application/json"),
                               "X-Replica-Id": replica.replica_id}
                    replica.served += 1
                    return web.Response(status=upstream.status, body=data, headers=headers), \
                        replica.replica_id, len(tried), None
            except NOTHING_RECEIVED as exc:
                self._refused(replica, exc)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                self._mark(replica, f"failed mid-response: {type(exc).__name__}")
                return error_response(502, f"{replica.replica_id} failed mid-response: {type(exc).__name__}",
                                      "server_error", "replica_failed"), replica.replica_id, len(tried), None
            finally:
                replica.in_flight -= 1

    async def _generate(self, request: web.Request, body: dict[str, Any], streaming: dict[str, Any]
                        ) -> tuple[web.StreamResponse, str | None, int, int | None]:
        """A completion: its legs on one replica after another until it is answered.

        A replica that refuses the connection is retried elsewhere at once. One that
        fails after the request reached it (reset or closed mid-answer, a stall, a
        drain deadline) has its answer continued on another from the tokens it made,
        at most `max_continuations` times, and never past a second failing replica:
        a request that brings down two engines is not sent on to a third.
        """
        splice = Splice(request.path, body)
        splice.not_continuable = why_not_continuable(request.path, body)
        request_id = streaming["request_id"] = uuid.uuid4().hex[:16]
        avoid: set[str] = set()        # replicas this request must not go to again
        failed_on: list[str] = []       # replicas that failed under it (not drains)
        attempts = 0
        cut: Cut | None = None          # the last leg's end, while a continuation is on its way
        while True:
            replica = await self._acquire(avoid)
            if replica is None:
                why = ("no other replica can take it over" if cut else
                       "every replica failed this request" if avoid else "no replica is ready")
                if cut is None and "response" not in streaming:
                    self.failed["unavailable"] += 1
                    return self._unavailable(why), None, attempts, None
                return await self._fail(request, splice, streaming, "no_replica", why, cut), \
                    None, attempts, len(splice.generated)
            avoid.add(replica.replica_id)
            attempts += 1
            route, engine_body = splice.next_request()
            flight = Flight(replica, cut, streaming, request_id, splice.replayed())
            try:
                outcome = await self._leg(request, route, engine_body, flight, splice, streaming)
            finally:
                flight.land()
            if isinstance(outcome, web.StreamResponse):
                if not flight.continuation_logged:  # a JSON answer: nothing was written while it was made
                    flight._log_continued(None)
                replica.served += 1
                replica.last_ok = self.clock()
                return outcome, replica.replica_id, attempts, len(splice.generated) if splice.identity else None
            if outcome is None:
                continue  # refused before the request reached it: marked, tried elsewhere
            cut = outcome
            if cut.reason == "rejected":  # the engine refused the continuation itself: no replica's fault
                return await self._fail(request, splice, streaming, "not_continuable",
                                        "the engine refused the continuation", cut), replica.replica_id, attempts, \
                    len(splice.generated)
            if cut.reason == "disconnect":
                self._mark(replica, f"failed mid-answer: {cut.detail}"[:300])
            if cut.reason == "disconnect" or (cut.reason == "stall" and cut.had_tokens):
                failed_on.append(replica.replica_id)
            if splice.finished():  # the answer was whole: only its end was missing
                return await self._close(request, splice, streaming, replica), replica.replica_id, attempts, \
                    len(splice.generated)
            why = self._why_not_continue(splice, failed_on, streaming.get("continued", 0), request_id)
            if why is not None:
                cause, text = why
                return await self._fail(request, splice, streaming, cause, text, cut), replica.replica_id, \
                    attempts, len(splice.generated)
            replica.continued_away += 1
            assert cut.reason in CONTINUATION_REASONS, cut.reason
            self.continuations[cut.reason] += 1
            streaming["continued"] = streaming.get("continued", 0) + 1

    def _why_not_continue(self, splice: Splice, failed_on: list[str], continued: int,
                          request_id: str) -> tuple[str, str] | None:
        reason = splice.can_continue()
        if reason is not None:
            return "not_continuable", f"the answer could not be continued: {reason}"
        if len(failed_on) >= QUERY_OF_DEATH_FAILURES:
            log.warning("suspected_query_of_death", request_id=request_id, replicas=failed_on)
            return "query_of_death", (f"the request failed on {len(failed_on)} replicas ({', '.join(failed_on)}); "
                                      f"it is not sent on (it may bring engines down)")
        if continued >= self.max_continuations:
            return "continuations_exhausted", f"continued {continued} times already (--max-continuations)"
        return None

    async def _leg(self, request: web.Request, route: str, body: dict[str, Any], flight: "Flight",
                   splice: Splice, streaming: dict[str, Any]) -> "web.StreamResponse | Cut | None":
        """One replica's part of an answer. Returns the client's response when the
        answer is complete, None when the replica refused the connection (nothing was
        sent), or the Cut that ended the leg early."""
        replica = flight.replica
        # The prefill allowance: a continuation's prompt is token ids (about 4 bytes of JSON each).
        prompt = body.get("prompt")
        replica.progress.sent(id(flight), time.perf_counter(),
                              4 * len(prompt) if isinstance(prompt, list) else request.content_length or 0)
        # A task of its own, so that a stall can end the leg before its response begins.
        post = flight.connecting = asyncio.ensure_future(self._session.post(replica.url + route, json=body))
        try:
            upstream = await post
        except NOT_CONNECTED as exc:
            self._refused(replica, exc)
            return None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            return flight.end(flight.cut_reason or "disconnect", f"{type(exc).__name__} before the response")
        except asyncio.CancelledError:
            if post.done() and not post.cancelled() and post.exception() is None:
                post.result().close()  # its response came just as the leg was cancelled
            if flight.cut_reason is None or asyncio.current_task().cancelling():
                raise  # the client left, or the request timed out
            return flight.end(flight.cut_reason, "no response began")
        flight.upstream = upstream
        if flight.cut_reason is not None:  # cut as its response arrived
            upstream.close()
        try:
            if upstream.status != 200 or not upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await self._not_a_stream(request, upstream, flight, splice, streaming)
            return await self._relay(request, upstream, flight, splice, streaming)
        finally:
            upstream.release()

    async def _not_a_stream(self, request: web.Request, upstream: aiohttp.ClientResponse, flight: "Flight",
                            splice: Splice, streaming: dict[str, Any]) -> "web.StreamResponse | Cut":
        """An engine's refusal (400 for a bad request, ...): passed on as it is when
        nothing was sent yet; a continuation refused is that leg's failure."""
        try:
            data = await upstream.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return flight.end(flight.cut_reason or "disconnect", f"{type(exc).__name__}")
        if flight.cut is not None or "response" in streaming:
            # (Not the engine's words: they may quote the request.) A 4xx is this
            # request's own fault, not the replica's.
            return flight.end("rejected" if upstream.status < 500 else "disconnect",
                              f"the continuation was answered {upstream.status}")
        headers = {"Content-Type": upstream.headers.get("Content-Type", "application/json"),
                   "X-Replica-Id": flight.replica.replica_id}
        return web.Response(status=upstream.status, body=data, headers=headers)

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse, flight: "Flight",
                     splice: Splice, streaming: dict[str, Any]) -> "web.StreamResponse | Cut":
        replica = flight.replica
        reader = EventReader()
        chunks = upstream.content.iter_any()
        relay = streaming.setdefault("relay", RelayFigures())
        while True:
            try:
                chunk = await chunks.__anext__()
            except StopAsyncIteration:
                break
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
                return flight.end(flight.cut_reason or "disconnect", f"{type(exc).__name__}")
            read_at = time.perf_counter()
            had = splice.chunks
            try:
                out = b"".join([splice.on_event(e) for e in reader.feed(chunk)])
            except EngineError as exc:
                return flight.end("disconnect", f"the engine failed: {exc}")
            except ValueError as exc:  # not JSON: not an engine we can read
                return flight.end("disconnect", f"unreadable event: {exc}"[:200])
            if splice.chunks != had:
                flight.progressed(read_at)
            if out:
                response = streaming.get("response") or await self._open_stream(request, replica, streaming)
                replica.writing += 1  # a client slow to read holds the reads: not the replica's silence
                try:
                    await response.write(out)
                except ConnectionResetError:
                    # The client left; release() closes the replica's stream. Not the replica's fault.
                    self.counts["clients_gone"] += 1
                    return response
                finally:
                    replica.writing -= 1
                written_at = time.perf_counter()
                if written_at - read_at > SLOW_RELAY_S:
                    flight.skip_gap = True  # the next gap is the client's, not the replica's
                relay.add(read_at, written_at)
                streaming.setdefault("first_chunk_at", written_at)
                flight.wrote(written_at)
                if splice.finished() or splice.done:
                    # The client has the whole answer; it may hang up before the stream's
                    # own end (the OpenAI SDK does): that is a request served.
                    streaming["complete"], streaming["tokens"] = True, len(splice.generated)
            if splice.done:
                break
        if not splice.done:  # the stream ended without its [DONE]
            return flight.end(flight.cut_reason or "disconnect", "the stream ended early")
        return await self._finish(request, splice, streaming, replica)

    async def _open_stream(self, request: web.Request, replica: Replica, streaming: dict[str, Any]
                           ) -> web.StreamResponse:
        response = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                           "X-Replica-Id": replica.replica_id})
        await response.prepare(request)
        streaming["response"], streaming["replica_id"] = response, replica.replica_id
        return response

    async def _finish(self, request: web.Request, splice: Splice, streaming: dict[str, Any],
                      replica: Replica) -> web.StreamResponse:
        if not splice.client_streams:
            if splice.engine_error is not None:
                code = splice.engine_error.get("code")
                return web.json_response({"error": splice.engine_error},
                                         status=code if isinstance(code, int) and 400 <= code < 600 else 400)
            return web.json_response(splice.answer(), headers={"X-Replica-Id": replica.replica_id})
        response = streaming.get("response") or await self._open_stream(request, replica, streaming)
        await response.write_eof()
        return response

    async def _close(self, request: web.Request, splice: Splice, streaming: dict[str, Any],
                     replica: Replica) -> web.StreamResponse:
        """The engine failed after the last token: the client gets the end it is owed."""
        if splice.client_streams:
            response = streaming.get("response") or await self._open_stream(request, replica, streaming)
            await _write_quietly(response, splice.closing())
            return response
        return await self._finish(request, splice, streaming, replica)

    async def _fail(self, request: web.Request, splice: Splice, streaming: dict[str, Any], cause: str,
                    message: str, cut: "Cut | None") -> web.StreamResponse:
        """The request ends with an error: an error event in a stream already under
        way, else a 502 (a replica took it and failed)."""
        assert cause in FAILURE_CAUSES, cause
        self.failed[cause] += 1
        self.counts["streams_broken"] += 1
        if cut is not None:
            message = f"{cut.replica_id} failed mid-answer ({cut.reason}: {cut.detail}); {message}"
        log.warning("request_failed", request_id=streaming.get("request_id"), cause=cause, reason=message)
        if "response" in streaming:  # ended as vLLM ends a stream after its own error event
            await _write_quietly(streaming["response"], sse_error(message, "replica_failed") + DONE)
            return streaming["response"]
        return error_response(502, message, "server_error", "replica_failed")

    def _refused(self, replica: Replica, exc: BaseException) -> None:
        replica.failed += 1
        self.counts["retries"] += 1
        self._mark(replica, f"{type(exc).__name__}: {exc}"[:300])

    async def _acquire(self, tried: set[str]) -> Replica | None:
        """The replica for the next attempt; waits (queues) while every one is at its
        limit, and for up to MARKED_WAIT_S while every one it may use is marked but
        still READY by its supervisor's word (a mark the /health watch may clear
        within a second: a busy head's own event loop has been seen to stall long
        enough to time out a good connect)."""
        loop = asyncio.get_running_loop()
        marked_until = None
        while True:
            replica = self.pool.pick(exclude=tried)
            if replica is not None:
                return replica
            if self.pool.has_capacity_somewhere(exclude=tried):
                self.counts["queued"] += 1
                await self._changed.wait()
                continue
            if self.draining or not any(r.ready and not r.retiring and r.replica_id not in tried
                                        for r in self.pool.marked()):
                return None
            marked_until = marked_until or loop.time() + MARKED_WAIT_S
            if loop.time() >= marked_until:
                return None
            self.counts["waited_for_marked"] += 1
            try:
                await asyncio.wait_for(self._changed.wait(), marked_until - loop.time())
            except asyncio.TimeoutError:
                return None


@dataclass
class Cut:
    """Why and when a leg of an answer ended early."""

    replica_id: str
    reason: str          # disconnect, stall or drain (CONTINUATION_REASONS), or rejected
    detail: str
    at: float            # perf_counter
    last_write: float | None  # the client's last byte before it
    had_tokens: bool     # the replica had made tokens of this leg before it ended


class Flight:
    """One request's stay on one replica: what the stall watch and a drain see of it."""

    __slots__ = ("replica", "cut", "streaming", "request_id", "replayed", "connecting", "upstream", "cut_reason",
                 "last_token", "skip_gap", "continuation_logged", "_landed")

    def __init__(self, replica: Replica, cut: Cut | None, streaming: dict[str, Any], request_id: str,
                 replayed: int) -> None:
        self.replica = replica
        self.cut = cut  # the previous leg's end, when this leg continues an answer
        self.streaming = streaming
        self.request_id = request_id
        self.replayed = replayed  # generated tokens given back to this replica as prompt
        self.connecting: asyncio.Future | None = None  # the request, until its response begins
        self.upstream: aiohttp.ClientResponse | None = None
        self.cut_reason: str | None = None  # set by the gateway when it ends this leg (stall, drain)
        self.last_token: float | None = None  # this leg's last progress (None: none yet)
        self.skip_gap = False  # the gap to the next progress is not the replica's to learn
        self.continuation_logged = cut is None
        self._landed = False
        replica.in_flight += 1
        replica.flights.add(self)
        if replica.in_flight == 1:
            replica.progress.busy(time.perf_counter())

    def progressed(self, now: float) -> None:
        gap = None if self.last_token is None or self.skip_gap else now - self.last_token
        self.last_token, self.skip_gap = now, False
        self.replica.progress.token(id(self), now, gap)

    def wrote(self, now: float) -> None:
        self.streaming["last_write"] = now
        if not self.continuation_logged:
            self._log_continued(now)

    def end(self, reason: str, detail: str) -> Cut:
        if not self.continuation_logged:
            self._log_continued(None)
        return Cut(self.replica.replica_id, reason, detail, time.perf_counter(), self.streaming.get("last_write"),
                   self.last_token is not None)

    def interrupt(self, reason: str) -> bool:
        """End this leg now (the replica stalled or must stop): its answer continues elsewhere."""
        if self.cut_reason is not None or (self.upstream is None and self.connecting is None):
            return False
        self.cut_reason = reason
        if self.upstream is not None:
            self.upstream.close()
        else:  # no response yet (a frozen engine); one that just arrived is closed by _leg
            self.connecting.cancel()
        return True

    def land(self) -> None:
        if not self._landed:
            self._landed = True
            self.replica.in_flight -= 1
            self.replica.flights.discard(self)
            self.replica.progress.ended(id(self))

    def _log_continued(self, first_write: float | None) -> None:
        cut = self.cut
        self.continuation_logged = True
        gap_from = cut.last_write if cut.last_write is not None else cut.at
        log.info("continued", request_id=self.request_id, from_replica=cut.replica_id,
                 to_replica=self.replica.replica_id, reason=cut.reason, detail=cut.detail,
                 tokens_replayed=self.replayed,
                 gap_ms=None if first_write is None else round((first_write - gap_from) * 1000, 1))


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


def _mid_answer(r: Replica) -> bool:
    """Some request on this replica has had a token of its current leg."""
    return any(f.last_token is not None for f in r.flights)


def _relay_fields(streaming: dict[str, Any]) -> dict[str, Any]:
    relay = streaming.get("relay")
    return relay.fields() if relay is not None else {}
