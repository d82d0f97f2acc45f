"""The head node: composes the parts that do the work and runs the ones each
lifecycle state needs. Bring-up is the Ray head's (controller/cluster/
ray_head.py), local workers are LocalWorkers', engines are the reconciler's
(controller/engines/reconciler.py), what is shown is the status view's
(controller/surface/status_view.py). Shutdown undoes start-up in reverse, by
construction: each part registers its own stop on the cleanup stack as it
starts."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import Any, Awaitable, Callable

from controller.cluster.coordinator import iso_now
from controller.cluster.local_cluster import LocalWorkers
from controller.cluster.monitors import ClusterMonitor, GcsCliMonitor
from controller.cluster.ray_adapter import RayAdapter, RayError, available_memory, object_store_bytes, shm_size
from controller.cluster.ray_head import RayHead
from controller.config import Config
from controller.engines.replica import ReplicaActor
from controller.engines.reconciler import Reconciler, build_reconciler
from controller.errors import FatalError
from controller.lifecycle.loop import Board
from controller.lifecycle.node import NodeBase
from controller.lifecycle.tasks import every
from controller.logs import log
from controller.serving.gateway import Gateway
from controller.surface.metrics import Metrics
from controller.surface.status_view import StatusView
from states import LIVE_STATES, Moved, Observation, State

REPLICA_STOP_S = (5.0, 30.0)  # bounds of the time given to stopping the replicas
BRING_UP_TASKS = ("bring_up", "local_workers", "engines")
MONITORS = ("cluster_monitor", "gcs_cli_monitor")


class HeadNode(NodeBase):
    def __init__(self, config: Config, board: Board, ray: RayAdapter, replica_actor: type = ReplicaActor) -> None:
        super().__init__(config, board, ray)
        self.replica_actor = replica_actor  # the class each replica runs as (a unit test hands in a fake)
        object_store = config.object_store_memory or object_store_bytes(
            available_memory(), shm_size(), nodes_on_machine=1 + config.local_workers)
        self.ray_head = RayHead(config, ray, object_store)
        self.local = LocalWorkers(config, object_store)
        self.engines: Reconciler | None = None
        self.metrics = Metrics()
        self.gateway = None if config.engine != "vllm" else Gateway(
            config.serve_host, config.serve_port, api_key=config.api_key, max_body_bytes=config.max_body_bytes,
            request_timeout=config.request_timeout, max_in_flight=config.max_in_flight,
            max_continuations=config.max_continuations, on_unhealthy=self._gateway_signal, metrics=self.metrics,
            clock=self.clock)
        self.view = StatusView(self, self.clock)
        self.since = iso_now()
        self.cleanup = AsyncExitStack()
        self.deadline = 0.0  # of the shutdown under way
        self.left: set[int] = set()  # pids that survived their stop
        self._monitors_started = False
        self._stopping: asyncio.Future | None = None  # set once the node began to stop; done once it stopped
        if self.gateway is not None:
            board.set(engines_ready=False)

    @property
    def address(self) -> str | None:
        return self.ray_head.address

    # -- Effects protocol --------------------------------------------------------------

    def on_moved(self, moved: Moved, record: dict[str, Any]) -> None:
        super().on_moved(moved, record)
        self.since = iso_now()
        self.tasks.forget("progress")  # a wait ended or began: its progress starts afresh
        if moved.dest is State.DEGRADED and moved.source is State.SERVING:
            first = self.board.first_fault()
            if first is not None:
                self.metrics.detection.observe(max(0.0, self.clock() - first))
        elif moved.dest is State.SERVING:
            if moved.source is State.DEGRADED:
                self.metrics.recovery.observe(record["in_state_s"])
            self.board.clear_faults()

    async def ensure(self, state: State, obs: Observation) -> None:
        if self._shutdown_done:
            return  # nothing may start again once the node began to stop
        self.tasks.ensure("reporter", self._report_loop)
        if state in (State.WAITING_FOR_WORKERS, State.DEGRADED):
            self.tasks.ensure("progress", self.view.report_progress)
        if state is State.JOINING:
            self.tasks.ensure("bring_up", self._bring_up)
        elif state in LIVE_STATES and self.coordinator is not None:
            self._start_monitors()
            if self.local.addresses and not self.local.started:
                self.local.started = True  # the "workers" step stops them
                self.tasks.ensure("local_workers", lambda: self.local.start_all(
                    self.coordinator, self.config.join_attempt_timeout))
            if self.gateway is not None and self.engines is None:
                self.engines = self._make_engines()
                self._stop_with("engines", self._stop_engines)
                self._stop_with("gateway drain", self._drain_gateway)  # runs first: requests before engines
                self.tasks.ensure("engines", self.engines.run)
                self.tasks.ensure("leave_watch", self.engines.watch_leaving)
        elif state is State.DRAINING:
            self.tasks.ensure("drain", self._drain)

    def _start_monitors(self) -> None:
        if self._monitors_started:
            return
        self._monitors_started = True
        self._stop_with("monitors", lambda: self.tasks.cancel(*MONITORS))
        cfg = self.config
        monitor = ClusterMonitor(self.ray, self.coordinator, self.board, self.clock)
        cli = GcsCliMonitor(self.ray, self.ray_head.gcs_address, self.board, self.clock)
        self.tasks.ensure("cluster_monitor", lambda: every(cfg.health_interval, monitor.check, "cluster"))
        self.tasks.ensure("gcs_cli_monitor", lambda: every(cfg.health_cli_interval, cli.check, "gcs_cli"))

    def _task_failed(self, name: str, exc: BaseException) -> None:
        if name in BRING_UP_TASKS:
            self.board.set(fatal=str(exc) if isinstance(exc, (FatalError, RayError)) else f"{name}: {exc!r}")
        elif name == "drain":
            self.board.set(drained=True)  # the final cleanup still runs

    # -- bring-up ----------------------------------------------------------------------

    async def _bring_up(self) -> None:
        self._stop_with("ray", self._stop_ray)  # also stops a Ray head whose start failed midway
        coordinator = await self.ray_head.bring_up()
        self.ray_node_id = self.ray_head.ray_node_id
        await coordinator.register(self.member_info("head", self.address))
        await coordinator.set_cluster(mode=self.config.mode, expected_nodes=self.config.expected_nodes)
        self.coordinator = coordinator
        self._stop_with("workers", self._stop_workers)
        self.board.set(head_up=True)

    def _make_engines(self) -> Reconciler:
        return build_reconciler(
            self.config, coordinator=self.coordinator, gateway=self.gateway, board=self.board, ray=self.ray,
            clock=self.clock, before_serving=lambda: self.state is State.WAITING_FOR_WORKERS,
            host=self.address or "127.0.0.1", gcs_address=self.ray_head.gcs_address,
            local_nodes=[self.config.node_ip_address or "", *self.local.addresses], replica_actor=self.replica_actor)

    def ready(self) -> bool:
        """Requests can be served: the cluster serves (at reduced capacity in DEGRADED,
        with replicas) and the gateway has a replica to send them to."""
        if self.gateway is None:
            return self.state is State.SERVING
        return self.state in (State.SERVING, State.DEGRADED) and self.gateway.can_serve()

    def _gateway_signal(self, reason: str, since: float) -> None:
        """A replica refused or reset a connection: the first sign of a failure. The
        reconciler decides, now rather than at its next round, what failed."""
        self.board.note_fault("gateway", since)
        if self.engines is not None:
            self.engines.wake()

    # -- what is shown -------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        return await self.view.status()

    async def metrics_text(self) -> bytes:
        """/metrics: the cluster's facts as of now, and the events observed so far."""
        return self.metrics.render(await self.view.status())

    async def _report_target(self):
        """Transitions before the coordinator exists (INIT -> JOINING) wait for it."""
        while self.coordinator is None and not self._shutdown_done:
            await asyncio.sleep(0.2)
        return self.coordinator

    # -- shutdown: each step registered by the part it undoes, run in reverse ----------------

    def _stop_with(self, what: str, step: Callable[[], Awaitable[None]]) -> None:
        async def run() -> None:
            try:
                await step()
            except Exception as exc:  # one failed step never skips the ones after it
                log.warning("shutdown_step_failed", step=what, error=f"{type(exc).__name__}: {exc}")
        self.cleanup.push_async_callback(run)

    def _remaining(self, floor: float = 0.0) -> float:
        return max(floor, self.deadline - self.clock())

    async def _drain(self) -> None:
        await self.shutdown(self.config.drain_timeout)
        self.board.set(drained=True)

    async def shutdown(self, timeout: float) -> None:
        """Ordered, bounded, idempotent: requests finished, engines stopped, workers
        told and gone, then our Ray stopped. A second call waits for the first."""
        if self._stopping is not None:
            await asyncio.shield(self._stopping)
            return
        self._stopping = asyncio.get_running_loop().create_future()
        try:
            await self._stop_all(timeout)
        finally:
            self._stopping.set_result(None)

    async def _stop_all(self, timeout: float) -> None:
        self._shutdown_done = True
        self.deadline = self.clock() + timeout
        if self.gateway is not None:
            self.gateway.start_draining()  # new requests get 503 from here on, whatever else happens
        # Nothing starts from here on; what runs stops in its own step, in order.
        await self.tasks.cancel("progress", "bring_up", "local_workers")
        await self.cleanup.aclose()
        await self.tasks.cancel_all()
        if self.left:
            log.error("processes_left_running", pids=sorted(self.left))
        log.info("head_shutdown_complete")

    async def _drain_gateway(self) -> None:
        await self.gateway.wait_idle(self._remaining())

    async def _stop_engines(self) -> None:
        await self.tasks.cancel("engines", "leave_watch")
        self.left |= await self.engines.stop(timeout=min(REPLICA_STOP_S[1], self._remaining(REPLICA_STOP_S[0])))

    async def _stop_workers(self) -> None:
        """Tell every worker to drain and wait, bounded, until they left Ray; then stop
        what is left of the local workers, by pid and process group. A coordinator or
        GCS that does not answer shortens the wait but never skips the stop."""
        members = self.view.last_members()
        try:
            await self.coordinator.set_desired("drain")
            log.info("workers_told_to_drain")
            await self.ray_head.wait_workers_gone(self._remaining)
            members = (await self.coordinator.snapshot()).members
        except Exception as exc:
            log.warning("drain_coordination_failed", error=f"{type(exc).__name__}: {exc}")
        await self.flush_reports(1.0)
        if self.local.started:
            self.left |= await self.local.stop(members, grace=self._remaining(1.0))

    async def _stop_ray(self) -> None:
        self.coordinator = None
        await self.ray.disconnect()
        self.left |= await self.ray.stop_node()
