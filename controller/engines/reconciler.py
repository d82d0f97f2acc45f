"""The head's engine reconciler: brings the engines in line with the cluster and
publishes their state. One `update()`, always in the same order:

1. read one coordinator snapshot;
2. retire the replicas of draining workers (no new requests at once; stopped
   once idle or at the drain deadline; the worker then released), and drop
   those whose node is gone;
3. ensure a replica on every chosen live node;
4. poll every replica's supervisor;
5. publish: to the gateway (where requests may go), the coordinator (the
   cluster's record) and the board (what the lifecycle decides on).

It is the only writer of the board's `engines_ready`, `engine_failure`,
`engine_stalled` and `node_lost`. Everything else that learns something about
an engine (the gateway's signal, a worker's DRAINING report) only wakes
`update()`.

A replica that fails on a node whose Ray node is gone (not listed alive, or its
raylet refuses connections) is recorded as the node's loss, whichever signal
came first: the replica's failure is the first sign, the trigger names the
cause (`node_lost`).
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, Callable

from controller.cluster.coordinator import CoordinatorClient
from controller.cluster.ray_adapter import RayAdapter
from controller.cluster.records import Desired, Member, ReplicaStatus, Snapshot
from controller.config import Config
from controller.engines.engine import EngineSpec, free_port
from controller.engines.replicas import ReplicaSet, one_machine_cpu_binding, replica_id_of
from controller.engines.sharded import REPLICA_ID as SHARDED_ID
from controller.engines.sharded import ShardedEngine, sharded_spec
from controller.engines.supervisor import EngineSupervisor
from controller.errors import FatalError
from controller.lifecycle.loop import Board
from controller.logs import log
from controller.serving.gateway import Gateway

# Engine polling while some engine is not READY yet (READY gates SERVING) or a
# draining worker waits for its replica to retire.
SETTLING_POLL_S = 0.25
# How long a raylet may take to accept a TCP connection before its node counts as gone.
RAYLET_CONNECT_TIMEOUT_S = 1.0
STOP_REPLICA_TIMEOUT_S = 10.0


class Reconciler:
    """What both modes share: the dependencies, the loop that runs `update()`, and
    publishing a failure to the board."""

    def __init__(self, coordinator: CoordinatorClient, gateway: Gateway, board: Board, ray: RayAdapter,
                 clock: Callable[[], float], *, expected_nodes: int, health_interval: float,
                 before_serving: Callable[[], bool]) -> None:
        self.coordinator = coordinator
        self.gateway = gateway
        self.board = board
        self.ray = ray
        self.clock = clock
        self.expected_nodes = expected_nodes
        self.health_interval = health_interval
        self.before_serving = before_serving  # True until the cluster first served
        self._wake = asyncio.Event()

    async def update(self) -> None:
        raise NotImplementedError

    def settled(self) -> bool:
        return bool(self.board.get("engines_ready"))

    # -- driving -------------------------------------------------------------------------

    def wake(self) -> None:
        """Run `update()` now rather than at the next interval."""
        self._wake.set()

    def interval(self) -> float:
        """Quick while engines start or restart or a replica retires; the health interval otherwise."""
        return self.health_interval if self.settled() else SETTLING_POLL_S

    async def run(self) -> None:
        """`update()` forever, each interval or when woken; a failed round is logged
        and retried (the coordinator's outage is the monitors' business), a
        FatalError ends the task (the node stops)."""
        while True:
            self._wake.clear()
            try:
                await self.update()
            except (asyncio.CancelledError, FatalError):
                raise
            except Exception as exc:
                log.warning("monitor_error", monitor="engines", error=f"{type(exc).__name__}: {exc}")
            try:
                await asyncio.wait_for(self._wake.wait(), self.interval())
            except asyncio.TimeoutError:
                pass

    def _publish_failure(self, failure: str | None, **more: Any) -> None:
        """The supervisors' word and the gateway's own signals, cross-checked: either
        one seeing a replica fail keeps the cluster DEGRADED, and so does a replica
        the gateway holds as stalled (no token progress, its engine's counters still)."""
        if failure:
            self.board.note_fault("engines", self.clock())
        else:
            self.board.clear_fault("engines")
        marked = self.gateway.failure()
        stalled = self.gateway.stalled()
        if not marked and not stalled:
            self.board.clear_fault("gateway")
        self.board.set(engine_failure=failure or marked, engine_stalled=stalled, **more)

    def _refuse_before_serving(self, given_up: str | None) -> None:
        if given_up and self.before_serving():
            # Before the cluster ever served, an engine that cannot start is a
            # configuration problem (bad model, taken port): say so now, not at
            # the wait timeout.
            raise FatalError(f"{given_up}; the cluster cannot serve")


class EngineReconciler(Reconciler):
    """Replicated mode: one replica per chosen live node."""

    def __init__(self, replicas: ReplicaSet, *args: Any, drain_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.replicas = replicas
        self.drain_timeout = drain_timeout
        self.retiring_since: dict[str, float] = {}  # draining worker -> when its replica began to retire
        self._poll: asyncio.Task | None = None
        self._poll_started: float | None = None
        # Failing replicas already checked for a lost node, and the verdict (None: its node answers).
        self._node_verdicts: dict[str, str | None] = {}

    def settled(self) -> bool:
        return super().settled() and not self.retiring_since

    async def watch_leaving(self, poll_timeout: float = 10.0) -> None:
        """Wake `update()` on every coordinator change: a worker that begins to drain
        then gets no new request from the moment its DRAINING report lands, not at
        the next interval (up to --health-interval later, long enough for a client
        to land on it)."""
        version = -1
        while True:
            try:
                info = await self.coordinator.wait_for_change(version, poll_timeout)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the coordinator's own monitors report an outage
                log.warning("monitor_error", monitor="leave_watch", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)
                continue
            if info.version != version:
                version = info.version
                self.wake()

    # -- one round -----------------------------------------------------------------------

    async def update(self) -> None:
        snap = await self.coordinator.snapshot()
        leaving = snap.leaving() if snap.desired is Desired.RUN else set()
        await self._retire(leaving)
        self.replicas.ensure([m for m in snap.members if m.serving_capacity], leaving=leaving)
        self._poll_when_due()
        statuses = self.replicas.statuses()  # each replica's last answer to a poll
        self.gateway.update_replicas(statuses)
        await self.coordinator.set_replicas(statuses)
        # Ready means a ready replica for every wanted node, not for the nodes seen
        # at this poll: a node that just joined has no replica yet, and the cluster
        # must not call itself recovered before it has one.
        self.board.set(engines_ready=self.replicas.all_ready(self.expected_nodes))
        await self._publish_health(snap)
        self._refuse_before_serving(self.replicas.given_up())

    def _poll_when_due(self) -> None:
        """Poll every replica's supervisor in the background, once per interval. A
        round never waits for a poll: a replica on a hung or dead node answers only
        at the poll's timeout, and a gateway's signal or a worker's DRAINING report
        must not queue behind it. The poll's end wakes `update()` to publish it."""
        if self._poll is not None and not self._poll.done():
            return
        if self._poll_started is not None and self.clock() - self._poll_started < self.interval():
            return
        self._poll_started = self.clock()
        self._poll = asyncio.get_running_loop().create_task(self._poll_once(), name="engines_poll")

    async def _poll_once(self) -> None:
        try:
            await self.replicas.poll()
        except Exception as exc:  # the next interval polls again
            log.warning("monitor_error", monitor="engines_poll", error=f"{type(exc).__name__}: {exc}")
        finally:
            self.wake()

    async def _retire(self, leaving: set[str]) -> None:
        """A worker that drains on its own (SIGTERM to it) keeps its replica until the
        requests in flight on it finish (bounded by --drain-timeout): no new ones go to
        it, then it is stopped and the worker is released to stop its Ray."""
        now = self.clock()
        for node_id in set(self.retiring_since) - leaving:
            del self.retiring_since[node_id]
        done = []
        for node_id in sorted(leaving):
            since = self.retiring_since.setdefault(node_id, now)
            in_flight = self.gateway.retire(replica_id_of(node_id)) if node_id in self.replicas.handles else None
            if in_flight and now - since < self.drain_timeout:
                continue  # its requests are still being answered
            # Past the deadline, what is still running is continued on the other
            # replicas before this one stops: cut here, not by the engine's end.
            moved = self.gateway.evacuate(replica_id_of(node_id), "drain") if in_flight else 0
            await self.replicas.stop_one(node_id, timeout=STOP_REPLICA_TIMEOUT_S)
            log.info("worker_released", node_id=node_id, requests_left=in_flight or 0, continued_elsewhere=moved,
                     waited_s=round(now - since, 2))
            done.append(node_id)
        if done:
            await self.coordinator.release(done)

    async def _publish_health(self, snap: Snapshot) -> None:
        """Engine failures, and a failing replica whose node is gone as that node's loss."""
        suspects = {s.replica_id for s in self.replicas.failing()} | {r.replica_id for r in self.gateway.pool.marked()}
        failure = self.replicas.failure()
        first_sign = self.gateway.failure() or failure
        self._publish_failure(failure, node_lost=await self._lost_node(snap, suspects, first_sign))

    async def _lost_node(self, snap: Snapshot, replica_ids: set[str], first_sign: str | None) -> str | None:
        """Why the node of one of these failing replicas is gone, if one is. Each
        failing replica's node is checked once per failure (Ray's node list, then its
        raylet's port), not at every round while an engine restarts."""
        for forgotten in set(self._node_verdicts) - replica_ids:
            del self._node_verdicts[forgotten]
        members = {replica_id_of(m.node_id): m for m in snap.members}
        fresh = [members[r] for r in sorted(replica_ids) if r in members and r not in self._node_verdicts]
        if fresh:
            try:
                nodes = {n["NodeID"]: n for n in await self.ray.nodes()}
            except Exception as exc:  # the GCS monitors say so; a node loss is not proven here
                log.warning("node_check_failed", error=f"{type(exc).__name__}: {exc}")
                return None
            for m in fresh:
                self._node_verdicts[replica_id_of(m.node_id)] = await self._node_gone(m, nodes, first_sign)
        return next((v for v in self._node_verdicts.values() if v), None)

    async def _node_gone(self, m: Member, nodes: dict[str, dict[str, Any]], first_sign: str | None) -> str | None:
        sign = first_sign or f"{replica_id_of(m.node_id)} failed"
        node = nodes.get(m.ray_node_id or "")
        if not m.alive or node is None or not node.get("Alive"):
            return f"{m.node_id}'s Ray node is gone (first sign: {sign})"
        # Refused: nothing listens there any more. Timed out: the machine does not
        # answer at all (power, network). A live machine's kernel accepts at once.
        refused = await self.ray.raylet_refuses(node, RAYLET_CONNECT_TIMEOUT_S)
        return f"{m.node_id}'s raylet does not answer ({refused}; first sign: {sign})" if refused else None

    # -- what others read ------------------------------------------------------------------

    def progress(self) -> tuple[int, int]:
        """(engines ready, engines wanted)."""
        return self.replicas.ready_count(), self.replicas.wanted(self.expected_nodes)

    def restarts_total(self) -> int:
        return self.replicas.restarts_total()

    async def stop(self, timeout: float) -> set[int]:
        """Stop every replica (their engines go with them); nothing to do without Ray."""
        if self._poll is not None:
            self._poll.cancel()
        if self.ray.connected:
            await self.replicas.stop_all(timeout=timeout)
        return set()


class ShardedReconciler(Reconciler):
    """Sharded mode: the one engine spanning every node, launched once every expected
    node is alive and the GPUs fit, stopped on a node loss."""

    def __init__(self, sharded: ShardedEngine, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sharded = sharded

    async def watch_leaving(self) -> None:  # a sharded engine spans every node: nothing retires alone
        await asyncio.Event().wait()

    async def update(self) -> None:
        gpus = (await self.ray.cluster_resources()).get("GPU", 0.0)
        problem = await self.sharded.reconcile(self.board.get("alive_nodes"), self.expected_nodes, gpus)
        if problem:
            raise FatalError(problem)
        statuses: list[ReplicaStatus] = self.sharded.statuses()
        self.gateway.update_replicas(statuses)
        await self.coordinator.set_replicas(statuses)
        self.board.set(engines_ready=self.sharded.ready())
        self._publish_failure(self.sharded.failure())
        self._refuse_before_serving(self.sharded.given_up())

    def progress(self) -> tuple[int, int]:
        return int(self.sharded.ready()), 1

    def restarts_total(self) -> int:
        return self.sharded.restarts_total()

    async def stop(self, timeout: float) -> set[int]:
        """Stop the engine; returns pids that survived."""
        return await self.sharded.stop()


def served_name(model: str | None) -> str:
    """The model name clients use: `tiny` for the tiny model, else the path's last part."""
    if model in (None, "tiny"):
        return "tiny"
    return model.rstrip("/").rsplit("/", 1)[-1]


def build_reconciler(cfg: Config, *, coordinator: CoordinatorClient, gateway: Gateway, board: Board,
                     ray: RayAdapter, clock: Callable[[], float], before_serving: Callable[[], bool], host: str,
                     gcs_address: str, local_nodes: list[str], replica_actor: type) -> Reconciler:
    """The engines of the configured mode, and the reconciler that keeps them."""
    supervision = {"ready_timeout": cfg.engine_timeout, "probe_interval": cfg.probe_interval,
                   "max_restarts": cfg.engine_restarts}
    shared = dict(coordinator=coordinator, gateway=gateway, board=board, ray=ray, clock=clock,
                  expected_nodes=cfg.expected_nodes, health_interval=cfg.health_interval,
                  before_serving=before_serving)
    if cfg.mode == "sharded":
        def spec() -> EngineSpec:
            model = cfg.model or "tiny"
            if model == "tiny":
                from controller.engines.tiny_model import ensure_tiny_model

                model = str(ensure_tiny_model())
            return sharded_spec(model, served_name(cfg.model), host, cfg.engine_port or free_port(host),
                                cfg.tensor_parallel_size, cfg.pipeline_parallel_size, gcs_address)

        sharded = ShardedEngine(lambda: EngineSupervisor(SHARDED_ID, spec, **supervision),
                                cfg.tensor_parallel_size, cfg.pipeline_parallel_size)
        return ShardedReconciler(sharded, **shared)
    replicas = ReplicaSet(ray, model=cfg.model or "tiny", served_name=served_name(cfg.model),
                          limit=cfg.replicas, engine_port=cfg.engine_port, supervision=supervision,
                          engine_env=one_machine_cpu_binding(local_nodes, sorted(os.sched_getaffinity(0))),
                          actor_class=replica_actor)
    return EngineReconciler(replicas, **shared, drain_timeout=cfg.drain_timeout)
