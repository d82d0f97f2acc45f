"""A worker node's effects: join the head with bounded retries, register with
the coordinator, follow the cluster, and leave in order."""

from __future__ import annotations

import asyncio
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_fixed,
)

from controller.cluster import ray_token
from controller.cluster.coordinator import CoordinatorClient, Refused, iso_now
from controller.cluster.records import Desired
from controller.logs import log
from controller.cluster.monitors import CoordinatorWatch, GcsCliMonitor
from controller.engines.reconciler import SETTLING_POLL_S, STOP_REPLICA_TIMEOUT_S
from controller.lifecycle.node import NodeBase
from controller.cluster.ray_adapter import RayError
from controller.lifecycle.tasks import every
from states import LIVE_STATES, Moved, Observation, State

MONITORS = ("heartbeat", "watch", "gcs_cli_monitor")

# Stopping, once the drain's time is spent, whatever state the rest of the cluster is
# in: a worker told to stop is gone within its drain timeout plus STOP_BOUND_S, its
# head there to release it or not. The parts, measured here: its tasks (monitors,
# join, reporter) are cancelled twice and get TASK_CANCEL_S each time to end (they end
# at once; the time is there because the deadline may have passed already).
# ray.shutdown() takes 5.0 s when the head's GCS is gone (Ray flushes its task events
# to the GCS for up to 5 s, task_events_shutdown_flush_timeout_ms) and never returns
# when it hangs (cut at RAY_SHUTDOWN_S; the thread is left behind, see run_node), well
# under a second otherwise. A raylet whose GCS is gone takes 10 s to exit on SIGTERM,
# one whose GCS is there well under a second: it gets RAY_TERM_GRACE_S, then SIGKILL,
# and the kernel up to RAY_KILL_WAIT_S (processes.terminate's) to end what was killed.
TASK_CANCEL_S = 0.25
RAY_SHUTDOWN_S = 5.5
RAY_TERM_GRACE_S = 2.0
RAY_KILL_WAIT_S = 5.0
STOP_BOUND_S = 2 * TASK_CANCEL_S + RAY_SHUTDOWN_S + RAY_TERM_GRACE_S + RAY_KILL_WAIT_S
# A worker that drains alone waits for the head's release past its own drain
# timeout by this much: the head's drain deadline for the worker's replica starts
# when the head sees the DRAINING report (a round later), and at that deadline the
# head continues the requests still running elsewhere and stops the replica (up to
# STOP_REPLICA_TIMEOUT_S) before it releases the worker. One clock decides, the
# head's; this only bounds a head that never answers.
RELEASE_GRACE_S = STOP_REPLICA_TIMEOUT_S + 4 * SETTLING_POLL_S + 2.0


class JoinError(RuntimeError):
    """One join attempt failed; another may succeed."""


class JoinRefused(RuntimeError):
    """The cluster refused this node (not retried: it would be refused again)."""


class WorkerNode(NodeBase):
    _join_attempt = 1  # of the join under way: the head counts the retries
    _stopping: asyncio.Future | None = None  # set once the node began to stop; done once it stopped

    # -- Effects protocol --------------------------------------------------------------

    def on_moved(self, moved: Moved, record: dict[str, Any]) -> None:
        self.state = moved.dest
        if moved.dest is State.JOINING and moved.source is not State.INIT:
            # A rejoin: the old connection belongs to a cluster that is gone.
            self.tasks.forget("join")
            for name in MONITORS:
                self.tasks.forget(name)
            self.board.set(joined=False, health_failures=0, last_health_error=None, cluster_state=None,
                           cluster_epoch=None, head_reachable=False, fenced=False, cluster_draining=False)
            self.board.health("coordinator", None)
            self.board.health("gcs_cli", None)
        super().on_moved(moved, record)

    async def ensure(self, state: State, obs: Observation) -> None:
        if self._shutdown_done:
            return  # nothing may start again once the node began to stop
        self.tasks.ensure("reporter", self._report_loop)
        if state is State.JOINING:
            self.tasks.ensure("join", self._join)
        elif state in LIVE_STATES and self.coordinator is not None:
            if not self.tasks.running("heartbeat"):
                self._start_monitors()
        elif state is State.DRAINING:
            self.tasks.ensure("leave", self._leave)

    def _start_monitors(self) -> None:
        """Monitors of the coordinator this node joined (built again after a rejoin)."""
        assert self.coordinator is not None
        watch = CoordinatorWatch(self.coordinator, self.board, self.config.node_id)
        cli = GcsCliMonitor(self.ray, self.config.head_address, self.board, self.clock)
        self.tasks.ensure("heartbeat", lambda: every(self.config.health_interval, watch.heartbeat, "heartbeat"))
        self.tasks.ensure("watch", lambda: every(0.0, watch.watch, "watch"))
        # `ray health-check` is costly: rarely while healthy, more often once in doubt.
        self.tasks.ensure("gcs_cli_monitor", lambda: every(self._cli_interval, cli.check, "gcs_cli"))

    def _cli_interval(self) -> float:
        if self.board.get("health_failures", 0):
            return max(5.0, self.config.health_interval)
        return self.config.health_cli_interval

    def _task_failed(self, name: str, exc: BaseException) -> None:
        if name == "join":
            self.board.set(fatal=str(exc))
        elif name == "leave":
            self.board.set(drained=True)

    # -- joining -----------------------------------------------------------------------

    async def _join(self) -> None:
        cfg = self.config
        await self._release_ray()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(cfg.join_attempts),
            wait=wait_fixed(cfg.join_delay),
            retry=retry_if_exception_type((JoinError, RayError, asyncio.TimeoutError)),
            reraise=True,
            before_sleep=self._log_retry,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    number = self._join_attempt = attempt.retry_state.attempt_number
                    log.info("join_attempt", attempt=number, attempts=cfg.join_attempts,
                             head_address=cfg.head_address)
                    try:
                        await asyncio.wait_for(self._join_once(), cfg.join_attempt_timeout)
                    except asyncio.TimeoutError:
                        await self._release_ray()
                        raise JoinError(f"join attempt took longer than {cfg.join_attempt_timeout:g}s") from None
                    except BaseException:
                        await self._release_ray()
                        raise
        except (JoinError, RayError) as exc:
            raise JoinError(f"could not join the head at {cfg.head_address} after "
                            f"{cfg.join_attempts} attempts: {exc}") from None

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("join_attempt_failed", attempt=state.attempt_number, attempts=self.config.join_attempts,
                    wait_s=state.next_action.sleep if state.next_action else None,
                    error=str(exc) if exc else None)

    async def _join_once(self) -> None:
        cfg = self.config
        unreachable = await self.ray.address_refuses(cfg.head_host, cfg.head_port)
        if unreachable:  # `ray start` would hang for minutes on a head that is not there
            raise JoinError(f"head not reachable: {unreachable}")
        try:
            await self.ray.start(["--address", cfg.head_address] + (
                ["--object-store-memory", str(cfg.object_store_memory)] if cfg.object_store_memory else []
            ), timeout=cfg.join_attempt_timeout)
            await self.ray.connect(cfg.head_address, timeout=30.0)
        except RayError as exc:
            if ray_token.is_refusal(str(exc)):
                # Another attempt would present the same token: say so now.
                raise JoinRefused("the head's Ray refused this node's token (InvalidAuthToken): give the worker "
                                  "the cluster's token (--ray-token-file PATH or LLMCTL_RAY_TOKEN; the head keeps "
                                  "it in its state dir, ray-auth-token)") from None
            raise
        self.ray_node_id = self.ray.ray_node_id()
        coordinator = await self._find_coordinator()
        try:
            await coordinator.register(self.member_info("worker", cfg.node_ip_address,
                                                        join_attempt=self._join_attempt))
        except Refused as exc:
            # Ray raises a subclass whose text is the actor's traceback; the reason is its cause.
            reason = getattr(exc, "cause", None) or exc
            raise JoinRefused(f"the coordinator refused this node: {reason}") from None
        self.coordinator = coordinator
        log.info("registered", epoch=coordinator.epoch, ray_node_id=self.ray_node_id)
        self.board.set(joined=True, my_epoch=coordinator.epoch, cluster_epoch=coordinator.epoch)

    async def _find_coordinator(self) -> CoordinatorClient:
        """The head creates the coordinator right after its Ray head: wait for it briefly."""
        while True:
            try:
                return await CoordinatorClient.attach(self.ray)
            except LookupError:
                await asyncio.sleep(1.0)

    async def _release_ray(self) -> None:
        """Close the driver and stop this node's Ray processes, in a fixed time (see STOP_BOUND_S)."""
        self.coordinator = None
        await self.ray.disconnect(timeout=RAY_SHUTDOWN_S)
        await self.ray.stop_node(grace=RAY_TERM_GRACE_S)

    # -- leaving -------------------------------------------------------------------------

    async def _leave(self) -> None:
        """The drain: the head's release decides when this node's replica is done (the
        head continues its last requests elsewhere at its own drain deadline), waited
        for until the drain timeout plus RELEASE_GRACE_S at most; stopping follows
        within STOP_BOUND_S, whether or not the head is there."""
        deadline = self.clock() + self.config.drain_timeout + RELEASE_GRACE_S
        await self._wait_released(deadline)
        await self._stop(deadline)
        self.board.set(drained=True)

    async def _wait_released(self, deadline: float) -> None:
        """A worker that drains alone (the cluster runs on) hosts a replica with requests
        in flight: wait, until `deadline` at most, until the head has retired it and
        released this node, so that stopping Ray cuts no request short. Nothing to wait
        for when the whole cluster drains (the head stops the replicas first) or when
        this node has none. Every coordinator call is cut at the deadline: a head that
        is gone or hung costs no more than the drain timeout."""
        if self.coordinator is None:
            return
        coordinator = self.coordinator
        try:
            await self.flush_reports(min(2.0, self._left(deadline)))  # the head must see DRAINING
            snap = await asyncio.wait_for(coordinator.snapshot(), self._left(deadline))
            mine = [r for r in snap.replicas if r.node_id == self.config.node_id]
            if snap.desired is Desired.DRAIN or not mine:
                return
            log.info("waiting_for_release", replica_id=mine[0].replica_id, timeout_s=round(self._left(deadline), 2))
            started = self.clock()
            info = snap
            while self.config.node_id not in info.released and info.desired is not Desired.DRAIN:
                remaining = self._left(deadline)
                if remaining <= 0:
                    log.warning("release_wait_timed_out", waited_s=round(self.clock() - started, 2))
                    return
                info = await asyncio.wait_for(coordinator.wait_for_change(info.version, min(remaining, 10.0)),
                                              remaining)
            log.info("released", waited_s=round(self.clock() - started, 2))
        except Exception as exc:  # the head is gone, hung or unreachable: nothing to wait for
            log.warning("release_wait_failed", error=f"{type(exc).__name__}: {exc}")

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Leave the cluster within `timeout` plus STOP_BOUND_S. Idempotent: a call
        while the drain's own stop is under way waits for that one."""
        await self._stop(self.clock() + timeout)

    async def _stop(self, deadline: float) -> None:
        """Monitors off and the last reports sent, until `deadline` at most; then the
        driver closed and our Ray processes stopped: all within STOP_BOUND_S after it."""
        if self._stopping is not None:
            await asyncio.shield(self._stopping)  # bounded: that stop is
            return
        self._stopping = asyncio.get_running_loop().create_future()
        self._shutdown_done = True
        try:
            await self.tasks.cancel(*MONITORS, "join", timeout=max(TASK_CANCEL_S, self._left(deadline)))
            await self.flush_reports(min(2.0, self._left(deadline)))  # the DRAINING report, if it can go
            await self.tasks.cancel_all(timeout=max(TASK_CANCEL_S, self._left(deadline)))
            await self._release_ray()
            log.info("worker_left", at=iso_now())
        finally:
            self._stopping.set_result(None)

    def _left(self, deadline: float) -> float:
        """Seconds until `deadline`; 0 once it passed."""
        return max(0.0, deadline - self.clock())
