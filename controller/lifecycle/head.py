"""The head node's effects: start or re-attach to the Ray head, run the
coordinator, start local workers, watch the cluster, and shut down in order."""

from __future__ import annotations

import asyncio
import time
import os
from collections import deque
from pathlib import Path
from typing import Any

from controller import processes
from controller.cluster import ray_token
from controller.config import Config
from controller.cluster.coordinator import ACTOR_NAME, CoordinatorClient, iso_now
from controller.cluster.local_cluster import LocalWorkers
from controller.logs import log
from controller.lifecycle.loop import Board
from controller.cluster.monitors import GONE_STATES, ClusterMonitor, GcsCliMonitor
from controller.lifecycle.node import NodeBase
from controller.engines.engine import EngineSpec, free_port
from controller.serving.gateway import Gateway
from controller.surface.metrics import Metrics
from controller.engines.replicas import ReplicaSet, one_machine_cpu_binding
from controller.engines.sharded import REPLICA_ID as SHARDED_ID
from controller.engines.sharded import ShardedEngine, sharded_spec
from controller.engines.supervisor import EngineSupervisor
from controller.cluster.ray_adapter import (
    HEALTH_CHECK_PRESETS,
    RayError,
    available_memory,
    object_store_bytes,
    port_free,
    shm_size,
)
from controller.lifecycle.tasks import every
from states import Moved, Observation, State

RAY_START_TIMEOUT = 60.0
STALE_GCS_WAIT_S = 90.0
# Engine polling while some engine is not READY yet: READY gates SERVING.
SETTLING_POLL_S = 0.25
PROGRESS_POLL_S, PROGRESS_EVERY_S = 1.0, 10.0
LIVE_STATES = (State.WAITING_FOR_WORKERS, State.SERVING, State.DEGRADED)


def served_name(model: str | None) -> str:
    """The model name clients use: `tiny` for the tiny model, else the path's last part."""
    if model in (None, "tiny"):
        return "tiny"
    return model.rstrip("/").rsplit("/", 1)[-1]


def draining_members(snap: dict[str, Any]) -> set[str]:
    """Workers that drain on their own and that the head has not released yet."""
    released = set(snap.get("released", []))
    return {m["node_id"] for m in snap["members"]
            if m["alive"] and m["state"] == "DRAINING" and m["node_id"] not in released}


class FatalError(RuntimeError):
    """An error the node cannot recover from; the message is the one-line reason."""


def next_epoch(state_dir: str) -> int:
    """Read, increment and persist the cluster epoch (one per new Ray head)."""
    path = Path(state_dir) / "epoch"
    try:
        last = int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        last = 0
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(f"{last + 1}\n")
    os.replace(tmp, path)
    return last + 1


class HeadNode(NodeBase):
    def __init__(self, config: Config, board: Board) -> None:
        super().__init__(config, board)
        self.object_store = config.object_store_memory or object_store_bytes(
            available_memory(), shm_size(), nodes_on_machine=1 + config.local_workers
        )
        self.local = LocalWorkers(config, self.object_store)
        self.address = config.node_ip_address
        self.history: deque[dict[str, Any]] = deque(maxlen=200)
        self.since = iso_now()
        self.replicas: ReplicaSet | None = None
        self.sharded: ShardedEngine | None = None
        self.gateway: Gateway | None = None
        self.metrics = Metrics()
        self._retiring_since: dict[str, float] = {}  # draining worker -> when its replica began to retire
        if config.engine == "vllm":
            self.gateway = Gateway(config.serve_host, config.serve_port, api_key=config.api_key,
                                   max_body_bytes=config.max_body_bytes, request_timeout=config.request_timeout,
                                   max_in_flight=config.max_in_flight, on_unhealthy=self._gateway_signal,
                                   metrics=self.metrics)
            supervision = {"ready_timeout": config.engine_timeout, "probe_interval": config.probe_interval,
                           "max_restarts": config.engine_restarts}
            if config.mode == "sharded":
                self.sharded = ShardedEngine(
                    lambda: EngineSupervisor(SHARDED_ID, self._sharded_spec, **supervision),
                    config.tensor_parallel_size, config.pipeline_parallel_size)
            else:
                local_nodes = [config.node_ip_address or "", *self.local.addresses]
                self.replicas = ReplicaSet(model=config.model or "tiny", served_name=served_name(config.model),
                                           limit=config.replicas, engine_port=config.engine_port,
                                           supervision=supervision,
                                           engine_env=one_machine_cpu_binding(
                                               local_nodes, sorted(os.sched_getaffinity(0))))
            board.set(engines_ready=False)

    # -- Effects protocol --------------------------------------------------------------

    def on_moved(self, moved: Moved, record: dict[str, Any]) -> None:
        super().on_moved(moved, record)
        self.since = iso_now()
        self.history.append({"at": self.since, "node_id": self.config.node_id, **record})
        self.metrics.transition("head", record)
        self.tasks.forget("progress")  # a wait ended or began: its progress starts afresh
        if moved.dest is State.DEGRADED and moved.source is State.SERVING:
            first = self.board.first_fault()
            if first is not None:
                self.metrics.detection.observe(max(0.0, time.monotonic() - first))
        elif moved.dest is State.SERVING:
            if moved.source is State.DEGRADED:
                self.metrics.recovery.observe(record["in_state_s"])
            self.board.clear_faults()

    def progress(self) -> dict[str, Any]:
        """How far the cluster is from serving in full: nodes joined, engines ready."""
        expected = self.config.expected_nodes
        if self.replicas is not None:
            engines = self.replicas.wanted(expected)
            ready = sum(1 for s in self.replicas.last.values() if s["state"] == "READY")
        elif self.sharded is not None:
            engines, ready = 1, int(self.sharded.ready())
        else:
            engines = ready = 0
        return {"nodes_alive": self.board.get("alive_nodes") or 0, "nodes_expected": expected,
                "engines_ready": ready, "engines_expected": engines}

    async def _report_progress(self) -> None:
        """A `progress` event while waiting for nodes and engines (bring-up, or a
        recovery): on each change and every PROGRESS_EVERY_S, one line on a terminal."""
        loop = asyncio.get_running_loop()
        waiting_in = self.state
        started, last, last_at = loop.time(), None, 0.0
        timeout = self.config.wait_timeout if waiting_in is State.WAITING_FOR_WORKERS else self.config.degraded_timeout
        while self.state is waiting_in:
            now, p = loop.time(), self.progress()
            if p != last or now - last_at >= PROGRESS_EVERY_S:
                elapsed = round(now - started, 1)
                line = (f"nodes {p['nodes_alive']}/{p['nodes_expected']} alive, engines "
                        f"{p['engines_ready']}/{p['engines_expected']} ready, {elapsed:.0f}s"
                        + (f" of {timeout:g}s" if timeout else ""))
                log.info("progress", state=waiting_in.value, line=line, elapsed_s=elapsed,
                         timeout_s=timeout or None, **p)
                last, last_at = p, now
            await asyncio.sleep(PROGRESS_POLL_S)

    async def metrics_text(self) -> bytes:
        """/metrics: the cluster's state as of now, and the events counted so far."""
        self.metrics.refresh(await self.status(), own_role="head")
        return self.metrics.render()

    async def ensure(self, state: State, obs: Observation) -> None:
        if self._shutdown_done:
            return  # nothing may start again once the node began to stop
        self.tasks.ensure("reporter", self._report_loop)
        if state in (State.WAITING_FOR_WORKERS, State.DEGRADED):
            self.tasks.ensure("progress", self._report_progress)
        if state is State.JOINING:
            self.tasks.ensure("bring_up", self._bring_up)
        elif state in LIVE_STATES and self.coordinator is not None:
            if not self.tasks.running("cluster_monitor"):
                self._start_monitors()
            if self.local.addresses:
                self.tasks.ensure("local_workers", self._start_local_workers)
            if self.config.engine == "vllm":
                self.tasks.ensure("engines", lambda: every(self._engine_poll_interval, self._reconcile_engines,
                                                           "engines"))
                if self.replicas is not None:
                    self.tasks.ensure("leave_watch", self._watch_leaving)
        elif state is State.DRAINING:
            self.tasks.ensure("drain", self._drain)

    def _start_monitors(self) -> None:
        assert self.coordinator is not None
        cfg = self.config
        monitor = ClusterMonitor(self.ray, self.coordinator, self.board, cfg.expected_nodes)
        cli = GcsCliMonitor(self.ray, self.gcs_address, self.board)
        self.tasks.ensure("cluster_monitor", lambda: every(cfg.health_interval, monitor.check, "cluster"))
        self.tasks.ensure("gcs_cli_monitor", lambda: every(cfg.health_cli_interval, cli.check, "gcs_cli"))

    # -- bring-up ----------------------------------------------------------------------

    @property
    def gcs_address(self) -> str:
        return f"{self.address or '127.0.0.1'}:{self.config.ray_port}"

    def _task_failed(self, name: str, exc: BaseException) -> None:
        if name in ("bring_up", "local_workers"):
            self.board.set(fatal=str(exc) if isinstance(exc, (FatalError, RayError)) else f"{name}: {exc!r}")
        elif name == "drain":
            self.board.set(drained=True)  # the final cleanup still runs

    async def _bring_up(self) -> None:
        cfg = self.config
        if port_free(self.address, cfg.ray_port):
            await self._start_new_cluster()
        else:
            await self._reattach()
        assert self.coordinator is not None
        await self.coordinator.register(self.member_info("head", self.address))
        await self.coordinator.set_cluster(state=self.state.value, mode=cfg.mode,
                                           expected_nodes=cfg.expected_nodes)
        self.board.set(head_up=True)

    async def _start_new_cluster(self) -> None:
        cfg = self.config
        log.info("ray_head_starting", port=cfg.ray_port, node_ip=self.address,
                 object_store_bytes=self.object_store, health_check=cfg.ray_health_check)
        args = ["--head", "--port", str(cfg.ray_port), "--object-store-memory", str(self.object_store),
                "--dashboard-host", "127.0.0.1"]
        await self._ray_start_head(args)
        await self.ray.connect(self.gcs_address, timeout=30.0)
        self.ray_node_id = self.ray.ray_node_id()
        if self.address is None:
            self.address = await self._own_address()
        epoch = next_epoch(cfg.state_dir)
        self.coordinator = await CoordinatorClient.create_or_attach(epoch, self.ray_node_id)
        log.info("coordinator_created", actor=ACTOR_NAME, epoch=self.coordinator.epoch)

    async def _ray_start_head(self, args: list[str]) -> None:
        """`ray start --head`, waiting out the Ray processes of a dead head's nodes.

        Ray refuses a head at an address that any local process still names as its
        GCS. On one machine, the nodes of a head that just died still do so for up
        to ~30 s, until their raylets notice the GCS is gone and exit.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STALE_GCS_WAIT_S
        while True:
            try:
                await self.ray.start(args, RAY_START_TIMEOUT, env=HEALTH_CHECK_PRESETS[self.config.ray_health_check])
                return
            except RayError as exc:
                if "is already running at" not in str(exc) or loop.time() >= deadline:
                    raise
                log.warning("ray_head_address_still_named", error=str(exc), retry_in_s=5)
                await asyncio.sleep(5)

    async def _reattach(self) -> None:
        """The Ray port is taken: our own Ray head left by a previous controller, or not ours."""
        cfg = self.config
        error = await self.ray.cli_health_check(self.gcs_address, timeout=10.0)
        if error and ray_token.is_refusal(error):
            raise FatalError(f"a Ray head already runs at {self.gcs_address} and refuses this controller's Ray "
                             "token: another cluster's head, or this one's started with another token "
                             "(--ray-token-file, LLMCTL_RAY_TOKEN, or STATE_DIR/ray-auth-token)")
        if error:
            raise FatalError(f"Ray port {cfg.ray_port} on {self.address or '0.0.0.0'} is in use "
                             f"by something that is not a Ray head ({error})")
        await self.ray.connect(self.gcs_address, timeout=30.0)
        try:
            self.coordinator = await CoordinatorClient.attach()
        except LookupError:
            raise FatalError(f"a Ray head already runs at {self.gcs_address} without a coordinator: "
                             "it is not ours; stop it or pick another --ray-port") from None
        snap = await self.coordinator.snapshot()
        head = next((m for m in snap["members"] if m["role"] == "head"), None)
        if head and head.get("pid") and head["pid"] != os.getpid() and processes.is_running(head["pid"]) \
                and head.get("address") == self.address:
            self.coordinator = None  # not ours to report to or shut down
            raise FatalError(f"another head controller (pid {head['pid']}) already runs the cluster "
                             f"at {self.gcs_address}")
        if head is None or head.get("address") != self.address:
            self.coordinator = None
            raise FatalError(f"the Ray head at {self.gcs_address} belongs to another node")
        self.ray_node_id = self.ray.ray_node_id()
        if head.get("ray_pgid"):
            self.ray.adopt(head["ray_pgid"])
        log.info("coordinator_reattached", epoch=self.coordinator.epoch, previous_pid=head.get("pid"),
                 members=len(snap["members"]))

    async def _own_address(self) -> str:
        for node in await self.ray.alive_nodes():
            if node["NodeID"] == self.ray_node_id:
                return node["NodeManagerAddress"]
        raise FatalError("the Ray head does not list its own node")

    async def _start_local_workers(self) -> None:
        """One at a time: raylets started together on one machine race for the same
        random ports (seen here: "bind: Address already in use" in the raylet)."""
        assert self.coordinator is not None
        loop = asyncio.get_running_loop()
        for address in self.local.addresses:
            members = None
            deadline = loop.time() + self.config.join_attempt_timeout
            while members is None:
                members = await self._members_or_none()
                if members is None:
                    if loop.time() >= deadline:
                        raise FatalError(f"the coordinator did not answer for {self.config.join_attempt_timeout:g}s "
                                         f"while starting the local worker {address}")
                    await asyncio.sleep(1.0)
            if not self.local.start_one(address, members):
                continue
            deadline = loop.time() + self.config.join_attempt_timeout
            while loop.time() < deadline:
                members = await self._members_or_none()
                if members and any(m.get("address") == address and m["alive"] for m in members):
                    break
                await asyncio.sleep(0.5)

    async def _members_or_none(self) -> list[dict[str, Any]] | None:
        """The coordinator's members, or None when it does not answer this time: a
        slow or paused coordinator is the health monitors' business, not a reason to
        stop starting local workers."""
        try:
            return (await self.coordinator.snapshot())["members"]
        except Exception as exc:
            log.warning("local_workers_wait", error=f"{type(exc).__name__}: {exc}")
            return None

    def ready(self) -> bool:
        """Requests can be served: the cluster serves (at reduced capacity in DEGRADED,
        with replicas) and the gateway has a replica to send them to."""
        if self.gateway is None:
            return self.state is State.SERVING
        return self.state in (State.SERVING, State.DEGRADED) and self.gateway.can_serve()

    def _gateway_signal(self, reason: str, since: float) -> None:
        """A replica refused or reset a connection: the loop hears it now, not at the next poll."""
        self.board.note_fault("gateway", since)
        self.board.set(engine_failure=reason)

    def _engine_poll_interval(self) -> float:
        """Quick while engines start or restart (READY gates SERVING) or a draining
        worker waits for its replica to retire; the health interval otherwise."""
        settled = self.board.get("engines_ready") and not self._retiring_since
        return self.config.health_interval if settled else SETTLING_POLL_S

    async def _reconcile_engines(self) -> None:
        """Bring the engines in line with the cluster and publish their state."""
        assert self.coordinator is not None and self.gateway is not None
        if self.replicas is not None:
            statuses = await self._reconcile_replicas()
            given_up, failure = self.replicas.given_up(), self.replicas.failure()
        else:
            statuses = await self._reconcile_sharded()
            given_up = self.sharded.given_up() if self.sharded else None
            failure = self.sharded.failure() if self.sharded else None
        if statuses is None:
            return
        self.gateway.update_replicas(statuses)
        # The supervisors' word and the gateway's own signals, cross-checked: either
        # one seeing a replica fail keeps the cluster DEGRADED.
        if failure:
            self.board.note_fault("engines", time.monotonic())
        else:
            self.board.clear_fault("engines")
        if not self.gateway.failure():
            self.board.clear_fault("gateway")
        self.board.set(engine_failure=failure or self.gateway.failure())
        if given_up and self.state is State.WAITING_FOR_WORKERS:
            # Before the cluster ever served, an engine that cannot start is a
            # configuration problem (bad model, taken port): say so now, not at
            # the wait timeout.
            self.board.set(fatal=f"{given_up}; the cluster cannot serve")

    async def _reconcile_replicas(self) -> list[dict[str, Any]]:
        """One replica per chosen live node: create the missing, poll all, publish their state."""
        assert self.replicas is not None and self.coordinator is not None
        snap = await self.coordinator.snapshot()
        members = [m for m in snap["members"] if m["alive"] and m["state"] not in GONE_STATES
                   and m.get("ray_node_id") and m.get("address")]
        leaving = draining_members(snap)
        await self._retire_leaving(leaving)
        self.replicas.ensure(members, leaving=leaving)
        statuses = await self.replicas.poll()
        await self.coordinator.set_replicas(statuses)
        # Ready means a ready replica for every wanted node, not for the nodes seen
        # at this poll: a node that just joined has no replica yet, and the cluster
        # must not call itself recovered before it has one.
        self.board.set(engines_ready=self.replicas.all_ready(self.config.expected_nodes))
        return statuses

    async def _watch_leaving(self) -> None:
        """A worker that begins to drain gets no new request from the moment its
        DRAINING report reaches the coordinator, not at the next engine poll (up to
        --health-interval later, long enough for a client to land on it). The engine
        poll does the rest: it stops the replica once idle and releases the worker."""
        assert self.gateway is not None
        version = -1
        while self.coordinator is not None:
            try:
                info = await self.coordinator.wait_for_change(version, 10.0)
                if info["version"] == version:
                    continue
                version = info["version"]
                snap = await self.coordinator.snapshot()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the coordinator's own monitors report an outage
                log.warning("monitor_error", monitor="leave_watch", error=f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(1.0)
                continue
            if snap["desired"] == "drain":
                continue  # the whole cluster drains: the gateway already refuses new requests
            for m in draining_members(snap):
                self.gateway.retire(f"replica-{m}")

    async def _retire_leaving(self, leaving: set[str]) -> None:
        """A worker that drains on its own (SIGTERM to it) keeps its replica until the
        requests in flight on it finish (bounded by --drain-timeout): no new ones go to
        it, then it is stopped and the worker is released to stop its Ray."""
        assert self.replicas is not None and self.coordinator is not None and self.gateway is not None
        now = time.monotonic()
        for node_id in set(self._retiring_since) - leaving:
            del self._retiring_since[node_id]
        done = []
        for node_id in sorted(leaving):
            since = self._retiring_since.setdefault(node_id, now)
            in_flight = self.gateway.retire(f"replica-{node_id}") if node_id in self.replicas.handles else None
            if in_flight and now - since < self.config.drain_timeout:
                continue  # its requests are still being answered
            await self.replicas.stop_one(node_id, timeout=10.0)
            log.info("worker_released", node_id=node_id, requests_left=in_flight or 0,
                     waited_s=round(now - since, 2))
            done.append(node_id)
        if done:
            await self.coordinator.release(done)

    async def _reconcile_sharded(self) -> list[dict[str, Any]] | None:
        assert self.sharded is not None and self.coordinator is not None
        gpus = (await self.ray.cluster_resources()).get("GPU", 0.0)
        problem = await self.sharded.reconcile(self.board.get("alive_nodes"), self.config.expected_nodes, gpus)
        if problem:
            self.board.set(fatal=problem)
            return None
        statuses = self.sharded.statuses()
        await self.coordinator.set_replicas(statuses)
        self.board.set(engines_ready=self.sharded.ready())
        return statuses

    def _sharded_spec(self) -> EngineSpec:
        cfg = self.config
        host = self.address or "127.0.0.1"
        model = cfg.model or "tiny"
        if model == "tiny":
            from controller.engines.tiny_model import ensure_tiny_model

            model = str(ensure_tiny_model())
        return sharded_spec(model, served_name(cfg.model), host, cfg.engine_port or free_port(host),
                            cfg.tensor_parallel_size, cfg.pipeline_parallel_size, self.gcs_address)

    # -- reporting -----------------------------------------------------------------------

    async def _report_target(self) -> CoordinatorClient | None:
        """Transitions before the coordinator exists (INIT -> JOINING) wait for it."""
        while self.coordinator is None and not self._shutdown_done:
            await asyncio.sleep(0.2)
        return self.coordinator

    async def _after_report(self, coordinator: CoordinatorClient, state: str) -> None:
        await coordinator.set_cluster(state=state)  # workers follow the head's state

    # -- shutdown ------------------------------------------------------------------------

    async def _drain(self) -> None:
        await self.shutdown(self.config.drain_timeout)
        self.board.set(drained=True)

    async def shutdown(self, timeout: float) -> None:
        """Ordered, bounded, idempotent: workers told and gone, then our Ray stopped."""
        if self._shutdown_done:
            return
        self._shutdown_done = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        if self.gateway is not None:
            # New requests get 503 from here on; the ones in flight finish first.
            self.gateway.start_draining()
            await self.gateway.wait_idle(max(0.0, deadline - loop.time()))
        await self.tasks.cancel("cluster_monitor", "gcs_cli_monitor", "local_workers", "bring_up", "engines",
                                "progress")
        left: set[int] = set()
        if self.sharded is not None:
            left |= await self.sharded.stop()
        if self.replicas is not None and self.ray.connected:
            try:
                await self.replicas.stop_all(timeout=max(5.0, min(30.0, deadline - loop.time())))
            except Exception as exc:
                log.warning("replicas_stop_failed", error=f"{type(exc).__name__}: {exc}")
        members: list[dict[str, Any]] = []
        if self.coordinator is not None:
            try:
                await self.coordinator.set_desired("drain")
                log.info("workers_told_to_drain")
                await self._wait_workers_gone(deadline)
                members = (await self.coordinator.snapshot())["members"]
            except Exception as exc:
                log.warning("drain_coordination_failed", error=f"{type(exc).__name__}: {exc}")
            await self._flush_reports(1.0)
        left |= await self.local.stop(members, grace=max(1.0, deadline - loop.time()))
        await self.tasks.cancel_all()
        self.coordinator = None
        await self.ray.disconnect()
        left |= await self.ray.stop_node()
        if left:
            log.error("processes_left_running", pids=sorted(left))
        log.info("head_shutdown_complete")

    def _replicas_with_load(self, replicas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        load = self.gateway.replica_load() if self.gateway else {}
        empty = {"in_flight": 0, "requests": 0, "failed": 0}
        return [{**r, **load.get(r["replica_id"], empty)} for r in replicas]

    def _gateway_status(self) -> dict[str, Any] | None:
        g = self.gateway
        if g is None:
            return None
        return {"port": g.port, "in_flight": g.in_flight, "draining": g.draining,
                "unhealthy": {r.replica_id: r.unhealthy for r in g.pool.marked()}, "counts": dict(g.counts)}

    async def _wait_workers_gone(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            try:
                others = [n for n in await self.ray.alive_nodes() if n["NodeID"] != self.ray_node_id]
            except RayError as exc:
                log.warning("drain_wait_failed", error=str(exc))
                return
            if not others:
                log.info("workers_gone")
                return
            await asyncio.sleep(0.5)
        log.warning("drain_timeout_workers_remain")

    # -- status ------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        cfg = self.config
        snap: dict[str, Any] | None = None
        if self.coordinator is not None and self.ray.connected:
            try:
                snap = await asyncio.wait_for(self.coordinator.snapshot(), 3.0)
            except Exception as exc:
                log.warning("status_snapshot_failed", error=f"{type(exc).__name__}: {exc}")
        head_entry = {"node_id": cfg.node_id, "role": "head", "state": self.state.value,
                      "address": self.address, "since": self.since, "pid": os.getpid(),
                      "alive": True, "ray_node_id": self.ray_node_id,
                      "ray_pgid": self.ray.node.pgid if self.ray.node else None}
        nodes: list[dict[str, Any]] = [head_entry]
        if snap is not None:
            for m in snap["members"]:
                if m["node_id"] == cfg.node_id:
                    head_entry["epoch"] = m.get("epoch")
                    continue
                nodes.append({k: m.get(k) for k in
                              ("node_id", "role", "state", "address", "since", "pid", "alive",
                               "ray_node_id", "ray_pgid", "epoch", "last_seen", "join_attempt")})
        return {
            "cluster": {
                "state": self.state.value,
                "epoch": self.epoch(),
                "mode": cfg.mode,
                "engine": cfg.engine,
                "expected_nodes": cfg.expected_nodes,
                "alive_nodes": self.board.get("alive_nodes"),
                "desired": snap["desired"] if snap else None,
                "coordinator_reachable": snap is not None,
            },
            "nodes": nodes,
            "replicas": self._replicas_with_load(snap["replicas"] if snap else []),
            "gateway": self._gateway_status(),
            "transitions": snap["transitions"] if snap else list(self.history),
            "transition_counts": snap.get("transition_counts", {}) if snap else {},
        }
