"""One engine replica: a Ray actor pinned to its node that runs and supervises a
vLLM server there (replicated mode).

The actor restarts its engine with bounded exponential backoff (tenacity) when
the process exits or when the generation probe fails `probe_threshold` times
in a row, and reports its state: STARTING, READY, RESTARTING, FAILED, STOPPED.
The engine is a child of the actor, so it goes down with its node.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from controller.engine import EngineFailed, EngineProcess, EngineSpec
from controller.logs import bind_node, configure_logging, log


class ReplicaActor:
    """Decorated with ray.remote where it is created (controller/replicas.py)."""

    def __init__(self, replica_id: str, node_id: str, spec: dict[str, Any], ready_timeout: float = 300.0,
                 probe_interval: float = 30.0, probe_timeout: float = 10.0, probe_threshold: int = 2,
                 max_restarts: int = 5) -> None:
        configure_logging("json")
        bind_node(node_id, "replica")
        self.replica_id = replica_id
        self.node_id = node_id
        self.spec_args = spec
        self.ready_timeout = ready_timeout
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.probe_threshold = probe_threshold
        self.max_restarts = max_restarts
        self.state = "STARTING"
        self.reason: str | None = None
        self.restarts = 0
        self.engine: EngineProcess | None = None
        self.spec: EngineSpec | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> dict[str, Any]:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._supervise())
        return await self.status()

    async def status(self) -> dict[str, Any]:
        return {"replica_id": self.replica_id, "node_id": self.node_id,
                "url": self.spec.url if self.spec else None, "state": self.state,
                "reason": self.reason, "restarts": self.restarts,
                "pid": self.engine.pid if self.engine else None}

    async def stop(self) -> dict[str, Any]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.engine is not None:
            await self.engine.stop()
        self.state = "STOPPED"
        return await self.status()

    def _resolve_spec(self) -> EngineSpec:
        args = dict(self.spec_args)
        if args["model"] == "tiny":
            from controller.tiny_model import ensure_tiny_model

            args["model"] = str(ensure_tiny_model())
        if not args.get("port"):
            from controller.engine import free_port

            args["port"] = free_port(args["host"])
        return EngineSpec(**args)

    async def _supervise(self) -> None:
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_restarts + 1),
            wait=wait_exponential(multiplier=1, min=1, max=30),
            retry=retry_if_exception_type(EngineFailed),
            reraise=True,
            before_sleep=self._before_restart,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._run_once()
        except EngineFailed as exc:
            self.state, self.reason = "FAILED", f"{exc} (gave up after {self.restarts} restarts)"
            log.error("replica_failed", replica_id=self.replica_id, reason=self.reason)

    def _before_restart(self, retry_state) -> None:
        self.restarts += 1
        self.state = "RESTARTING"
        log.warning("replica_restarting", replica_id=self.replica_id, restart=self.restarts,
                    wait_s=retry_state.next_action.sleep, reason=self.reason)

    async def _run_once(self) -> None:
        """One engine lifetime: start, wait ready, watch; raise EngineFailed when it ends."""
        self.spec = self.spec or self._resolve_spec()
        self.engine = EngineProcess(self.spec, self.replica_id)
        try:
            self.state = "STARTING" if self.restarts == 0 else "RESTARTING"
            await self.engine.start()
            await self.engine.wait_ready(self.ready_timeout)
            self.state, self.reason = "READY", None
            reason = await self._watch()
            raise EngineFailed(reason)
        except EngineFailed as exc:
            self.reason = str(exc)
            raise
        finally:
            if self.state != "STOPPED":
                await self.engine.stop()

    async def _watch(self) -> str:
        loop = asyncio.get_running_loop()
        next_probe = loop.time() + self.probe_interval
        failures = 0
        while True:
            await asyncio.sleep(1.0)
            assert self.engine is not None
            exited = self.engine.exit_reason()
            if exited:
                return exited
            if loop.time() >= next_probe:
                next_probe = loop.time() + self.probe_interval
                error = await self.engine.probe(timeout=self.probe_timeout)
                failures = 0 if error is None else failures + 1
                if failures >= self.probe_threshold:
                    return f"generation probe failed {failures} times in a row: {error}"
