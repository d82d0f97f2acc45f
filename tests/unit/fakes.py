"""Fakes for unit tests of the shell: a Ray you can kill nodes of (actors are
plain objects, called in-process), a replica actor that serves at once, and a
clock. The coordinator is the real one (`Coordinator`, on the real pure
`CoordinatorState`), created through the fake Ray like any actor, so the
membership rules and fencing under test are the product's own."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from controller.cluster.ray_adapter import RayError, RayNode
from controller.cluster.records import ReplicaState, ReplicaStatus


class NodeDead(ConnectionError):
    """What a call to an actor on a dead node raises here (Ray: ActorDiedError/unavailable)."""


@dataclass
class FakeNode:
    node_id: str
    address: str
    alive: bool = True
    raylet_answers: bool = True
    hung: bool = False  # SIGSTOP: calls to its actors never answer


@dataclass
class World:
    """One cluster's Ray, shared by every node's FakeRay."""

    nodes: dict[str, FakeNode] = field(default_factory=dict)
    actors: dict[str, tuple[Any, str]] = field(default_factory=dict)  # name -> (object, ray node id)
    head_port_open: bool = False
    paused: bool = False  # the coordinator does not answer (a GC pause, a busy head)

    def add_node(self, address: str) -> FakeNode:
        node = FakeNode(f"ray-{address}-{len(self.nodes)}", address)  # a node started again is a new Ray node
        self.nodes[node.node_id] = node
        return node

    def kill(self, address: str, declared_dead: bool = False) -> None:
        """SIGKILL a node: its raylet refuses at once; Ray lists it dead only later."""
        node = next(n for n in self.nodes.values() if n.address == address and n.alive)
        node.raylet_answers = False
        node.alive = not declared_dead


class FakeRay:
    """RayAdapter's interface over a World; `node_ip` names this node in it."""

    def __init__(self, world: World, node_ip: str) -> None:
        self.world = world
        self.node_ip = node_ip
        self.node: RayNode | None = None
        self.connected = False
        self.my_node: FakeNode | None = None
        self.started: list[list[str]] = []

    # -- this node's Ray
    async def start(self, args: list[str], timeout: float, env: dict[str, str] | None = None) -> RayNode:
        self.started.append(args)
        if "--head" in args:
            self.world.head_port_open = True
        elif not self.world.head_port_open:
            raise RayError("`ray start` failed (exit 1): could not reach the head")
        self.my_node = self.world.add_node(self.node_ip)
        self.node = RayNode(pgid=4242, started_here=True)
        return self.node

    def adopt(self, pgid: int) -> None:
        self.node = RayNode(pgid=pgid, started_here=False)

    async def stop_node(self, grace: float = 10.0) -> set[int]:
        if self.my_node is not None:
            self.my_node.alive = self.my_node.raylet_answers = False
        self.node = None
        return set()

    async def connect(self, address: str, timeout: float) -> None:
        self.connected = True

    async def disconnect(self, timeout: float = 10.0) -> None:
        self.connected = False

    def ray_node_id(self) -> str:
        assert self.my_node is not None
        return self.my_node.node_id

    @staticmethod
    def ray_version() -> str:
        return "2.60.0"

    # -- the cluster
    async def nodes(self) -> list[dict[str, Any]]:
        return [{"NodeID": n.node_id, "Alive": n.alive, "NodeManagerAddress": n.address,
                 "NodeManagerPort": 6380} for n in self.world.nodes.values()]

    async def alive_nodes(self) -> list[dict[str, Any]]:
        return [n for n in await self.nodes() if n["Alive"]]

    async def cluster_resources(self) -> dict[str, float]:
        return {"CPU": 2.0 * len(self.world.nodes)}

    async def cli_health_check(self, address: str, timeout: float = 5.0) -> str | None:
        return None if self.world.head_port_open else f"`ray health-check --address {address}` failed"

    async def address_refuses(self, host: str, port: int, timeout: float = 2.0) -> str | None:
        return None if self.world.head_port_open else f"{host}:{port}: Connection refused"

    def port_free(self, host: str | None, port: int) -> bool:
        return not self.world.head_port_open

    async def raylet_refuses(self, node: dict[str, Any], timeout: float) -> str | None:
        n = self.world.nodes[node["NodeID"]]
        return None if n.raylet_answers else f"{n.address}:6380: Connection refused"

    # -- actors
    def create_actor(self, cls: type, *args: Any, name: str, node_id: str, max_concurrency: int,
                     **kwargs: Any) -> Any:
        if name not in self.world.actors:
            self.world.actors[name] = (cls(*args, **kwargs), node_id)
        return name  # a handle: the actor's name

    async def get_actor(self, name: str, timeout: float) -> Any:
        if name not in self.world.actors:
            raise LookupError(f"no actor named {name}")
        return name

    async def call(self, handle: Any, method: str, *args: Any, timeout: float) -> Any:
        actor, node_id = self.world.actors[handle]
        node = self.world.nodes.get(node_id)
        if node is not None and node.hung or (self.world.paused and handle == "llm-controller-coordinator"):
            await asyncio.sleep(timeout)
            raise asyncio.TimeoutError()
        if node is not None and not node.raylet_answers:
            raise NodeDead(f"the actor {handle} died with its node {node.address}")
        return await asyncio.wait_for(getattr(actor, method)(*args), timeout)

    def fire(self, handle: Any, method: str, *args: Any) -> None:
        asyncio.get_running_loop().create_task(self.call(handle, method, *args, timeout=60))

    async def kill_actor(self, handle: Any) -> None:
        self.world.actors.pop(handle, None)


class FakeReplica:
    """A replica actor whose engine is READY as soon as it starts."""

    def __init__(self, replica_id: str, node_id: str, spec: dict[str, Any], **supervision: Any) -> None:
        self.replica_id, self.node_id, self.spec = replica_id, node_id, spec
        self.state = ReplicaState.STARTING
        self.stopped = False

    async def start(self) -> ReplicaStatus:
        self.state = ReplicaState.READY
        return await self.status()

    async def status(self, since: int | None = None) -> ReplicaStatus:
        return ReplicaStatus(self.replica_id, self.node_id, f"http://{self.spec['host']}:8100", self.state)

    async def stop(self) -> ReplicaStatus:
        self.state, self.stopped = ReplicaState.STOPPED, True
        return await self.status()


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
