"""One engine replica (replicated mode): a Ray actor pinned to its node that runs
an engine supervisor there.

The engine is a child of the actor, so it goes down with its node. The head
polls `status(since)`: the replica's state and the engine output lines it has
not seen yet, which the head writes into its own structured log.
"""

from __future__ import annotations

from typing import Any

from controller.cluster.records import ReplicaStatus
from controller.engines.engine import EngineSpec, free_port
from controller.logs import bind_node, configure_logging
from controller.preflight import model_problem
from controller.engines.supervisor import EngineSupervisor

# The tiny model is made for short prompts; a smaller context also keeps the
# CPU engine's start-up and memory down.
TINY_MAX_MODEL_LEN = 512


class ReplicaActor:
    """Decorated with ray.remote where it is created (controller/replicas.py)."""

    def __init__(self, replica_id: str, node_id: str, spec: dict[str, Any], **supervision: Any) -> None:
        configure_logging("json")
        bind_node(node_id, "replica")
        self.node_id = node_id
        self.spec_args = spec
        self.supervisor = EngineSupervisor(replica_id, self._resolve_spec, echo=False, **supervision)

    async def start(self) -> ReplicaStatus:
        self.supervisor.start()
        return await self.status()

    async def status(self, since: int | None = None) -> ReplicaStatus:
        """State, and with `since` the engine output lines numbered after it."""
        out = self.supervisor.status(self.node_id)
        if since is not None:
            out.output = self.supervisor.output_since(since)
        return out

    async def stop(self) -> ReplicaStatus:
        await self.supervisor.stop()
        return await self.status()

    def _resolve_spec(self) -> EngineSpec:
        """Done on the replica's node: the model path and the port are the node's."""
        args = dict(self.spec_args)
        if args["model"] == "tiny":
            from controller.engines.tiny_model import ensure_tiny_model

            args["model"] = str(ensure_tiny_model())
            args.setdefault("max_model_len", TINY_MAX_MODEL_LEN)
        else:
            problem = model_problem(args["model"])
            if problem:
                raise ValueError(f"{problem} on node {self.node_id}")
        if not args.get("port"):
            args["port"] = free_port(args["host"])
        return EngineSpec(**args)
