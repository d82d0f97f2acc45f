"""The engine supervisor: runs one engine, restarts it with bounded backoff, and
says what state it is in and why.

An engine lifetime is: start, wait until ready (`/health`, then one real token),
then watch it: the process exiting, or the generation probe failing
`probe_threshold` times in a row, ends the lifetime. A failed probe is not
counted when the engine's own token counters (`/metrics`) advanced since the
previous failed probe: a busy engine is alive, and restarting it would drop
every request it serves. tenacity restarts it with exponential backoff, at
most `max_restarts` times; then the supervisor is FAILED. Problems that a
restart cannot fix (a taken port, a missing model directory) fail at once.

States: STARTING, READY, RESTARTING, FAILED, STOPPED. Used by a replica actor
on its node (replicated mode) and by the head for the one sharded engine.
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

import aiohttp
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential

from controller.cluster.records import ReplicaState, ReplicaStatus
from controller.engines import engine_metrics
from controller.engines.engine import EngineFailed, EngineProcess, EngineSpec
from controller.engines.engine_metrics import EngineCounters
from controller.logs import log

READY, FAILED, STOPPED = ReplicaState.READY, ReplicaState.FAILED, ReplicaState.STOPPED
STARTING, RESTARTING = ReplicaState.STARTING, ReplicaState.RESTARTING
# Reading the engine's /metrics after a failed probe: a local request, quick
# even when the engine is busy (the API server answers it, not the engine core).
COUNTERS_TIMEOUT_S = 2.0
WATCH_TICK_S = 1.0  # how often the watch looks at the process

CountersReader = Callable[[aiohttp.ClientSession, str, float], Awaitable[EngineCounters]]


class EngineUnrecoverable(EngineFailed):
    """An engine failure that restarting cannot fix."""


def _restartable(exc: BaseException) -> bool:
    return isinstance(exc, EngineFailed) and not isinstance(exc, EngineUnrecoverable)


class EngineSupervisor:
    def __init__(self, replica_id: str, make_spec: Callable[[], EngineSpec], *, ready_timeout: float = 600.0,
                 probe_interval: float = 30.0, probe_timeout: float = 10.0, probe_threshold: int = 2,
                 max_restarts: int = 5, echo: bool = True, max_backoff: float = 30.0,
                 read_counters: CountersReader = engine_metrics.read_counters) -> None:
        self.replica_id = replica_id
        self.make_spec = make_spec
        self.ready_timeout = ready_timeout
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.probe_threshold = probe_threshold
        self.max_restarts = max_restarts
        self.max_backoff = max_backoff
        self.echo = echo
        self.read_counters = read_counters
        self.state = STARTING
        self.reason: str | None = None
        self.ready_s: float | None = None
        self.restarts = 0
        self.spec: EngineSpec | None = None
        self.engine: EngineProcess | None = None
        self._counters: EngineCounters | None = None  # this engine lifetime's last reading
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._supervise())

    def status(self, node_id: str | None = None) -> ReplicaStatus:
        return ReplicaStatus(replica_id=self.replica_id, node_id=node_id, url=self.spec.url if self.spec else None,
                             state=self.state, reason=self.reason, restarts=self.restarts,
                             pid=self.engine.pid if self.engine else None, ready_s=self.ready_s)

    def output_since(self, seq: int) -> list[tuple[int, str]]:
        return self.engine.output_since(seq) if self.engine else []

    async def stop(self) -> set[int]:
        """Stop supervising and stop the engine; returns pids that survived."""
        self.state = STOPPED
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        return await self.engine.stop() if self.engine is not None else set()

    async def _supervise(self) -> None:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_restarts + 1),
            wait=wait_exponential(multiplier=1, min=1, max=self.max_backoff),
            retry=retry_if_exception(_restartable),
            reraise=True,
            before_sleep=self._before_restart,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._run_once()
        except EngineFailed as exc:
            gave_up = "" if isinstance(exc, EngineUnrecoverable) else f" (gave up after {self.restarts} restarts)"
            self.state, self.reason = FAILED, f"{exc}{gave_up}"
            log.error("engine_given_up", replica_id=self.replica_id, reason=self.reason)
        except Exception as exc:  # a bug here must show as FAILED, not as an engine forever STARTING
            self.state, self.reason = FAILED, f"engine supervisor crashed: {type(exc).__name__}: {exc}"
            log.exception("engine_supervisor_crashed", replica_id=self.replica_id)

    def _before_restart(self, retry_state) -> None:
        self.restarts += 1
        self.state = RESTARTING
        log.warning("engine_restarting", replica_id=self.replica_id, restart=self.restarts,
                    of=self.max_restarts, wait_s=retry_state.next_action.sleep, reason=self.reason)

    async def _run_once(self) -> None:
        """One engine lifetime: start, wait ready, watch; raise EngineFailed when it ends."""
        try:
            self.spec = self.spec or self.make_spec()
        except (OSError, ValueError) as exc:
            raise EngineUnrecoverable(f"cannot prepare the engine: {exc}") from None
        previous = self.engine.seq if self.engine else 0
        self.engine = EngineProcess(self.spec, self.replica_id, echo=self.echo, first_seq=previous)
        self._counters = None
        try:
            self.state = STARTING if self.restarts == 0 else RESTARTING
            try:
                started = time.monotonic()
                await self.engine.start()
            except EngineFailed as exc:
                raise EngineUnrecoverable(str(exc)) from None  # the port stays taken
            await self.engine.wait_ready(self.ready_timeout)
            # How long this engine took from spawn to READY (warm-up included):
            # the engine's share of a start, as opposed to the controller's.
            self.ready_s = round(time.monotonic() - started, 3)
            self.state, self.reason = READY, None
            raise EngineFailed(await self._watch())
        except EngineFailed as exc:
            self.reason = str(exc)
            if self.state == READY:
                self.state = RESTARTING  # not serving from here on, while the engine stops
            raise
        finally:
            if self.state != STOPPED:
                await self.engine.stop()

    async def _watch(self) -> str:
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + self.probe_interval
        failures = 0
        while True:
            await asyncio.sleep(WATCH_TICK_S)
            assert self.engine is not None
            exited = self.engine.exit_reason()
            if exited:
                return exited
            if loop.time() >= next_probe:
                failures, error = await self._probe(failures)
                next_probe = loop.time() + self.probe_interval
                if failures >= self.probe_threshold:
                    return f"generation probe failed {failures} times in a row: {error}"

    async def _probe(self, failures: int) -> tuple[int, str | None]:
        """One generation probe: the consecutive failures after it, and its error.
        A failure while the engine's token counters advance is not counted."""
        assert self.engine is not None
        error = await self.engine.probe(timeout=self.probe_timeout)
        if error is None:
            return 0, None
        busy = await self._producing_tokens()
        failures = 0 if busy else failures + 1
        log.warning("generation_probe_failed", replica_id=self.replica_id, busy=busy, failures=failures,
                    of=self.probe_threshold, error=error)
        return failures, error

    async def _producing_tokens(self) -> bool:
        """The engine's generation or prompt token counter grew since the last reading
        of this lifetime. False when they cannot be read or there is no earlier reading."""
        assert self.engine is not None
        try:
            async with aiohttp.ClientSession() as http:
                now = await self.read_counters(http, self.engine.url, COUNTERS_TIMEOUT_S)
        except Exception as exc:  # unreadable: the failure counts, as without counters
            log.warning("engine_counters_unreadable", replica_id=self.replica_id, error=f"{type(exc).__name__}: {exc}")
            return False
        before, self._counters = self._counters, now
        return before is not None and now.advanced_since(before)
