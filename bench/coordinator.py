"""The coordinator at scale, simulated: one coordinator actor on a real Ray head
(a local one, started by this script) and N simulated members: lightweight
clients in this process, not raylets, each registering, heartbeating and
long-polling `wait_for_change` as a worker controller does.

For each N it reports p50/p99 of `register` and `heartbeat` calls (heartbeats
sent while every member also holds a long-poll), the fan-out time (one change
until every watcher has seen it), and the actor's resident memory.

    python -m bench.coordinator [--members 10 100 1000] [--heartbeat-seconds 10] [--out bench/results/coordinator.json]

Ray runs on this machine only (ray.init() starts a local head) and stops with
the script. Goal (issue 5): p99 at most 50 ms and fan-out at most 1 s at 1,000.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from bench.loadgen import summary

HEARTBEAT_PERIOD_S = 2.0  # what a worker controller sends (--health-interval)


def _ms(seconds: float | None) -> str:
    return "void (a long-poll timed out first)" if seconds is None else f"{seconds * 1000:.0f} ms"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


async def one_size(members: int, heartbeat_seconds: float, epoch: int) -> dict:
    import ray

    from controller.cluster.coordinator import CoordinatorClient
    from controller.cluster.ray_adapter import RayAdapter
    from controller.cluster.records import Member

    node_id = ray.get_runtime_context().get_node_id()
    client = await CoordinatorClient.create_or_attach(RayAdapter("127.0.0.2"), epoch, node_id)
    handle = client.handle
    pid = await handle.__ray_call__.remote(lambda self: __import__("os").getpid())

    async def timed(ref) -> float:
        t = time.perf_counter()
        await ref
        return time.perf_counter() - t

    names = [f"sim-{i}" for i in range(members)]
    register = await asyncio.gather(*(timed(handle.register.remote(
        Member(node_id=n, role="worker", ray_node_id=f"r-{n}", address=f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
               pid=1, ray_pgid=1, ray_version=ray.__version__, python_version="3.11"), epoch))
        for i, n in enumerate(names)))
    version = (await handle.info.remote()).version

    # Every member holds a long-poll, as a worker does, while heartbeating.
    seen: dict[str, float] = {}

    async def watch(name: str) -> None:
        await handle.wait_for_change.remote(version, 60.0)
        seen[name] = time.perf_counter()

    watchers = [asyncio.create_task(watch(n)) for n in names]
    await asyncio.sleep(1.0)
    heartbeats: list[float] = []

    async def beat(name: str) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + heartbeat_seconds
        await asyncio.sleep(HEARTBEAT_PERIOD_S * (hash(name) % 1000) / 1000)  # spread, as real nodes are
        while loop.time() < end:
            heartbeats.append(await timed(handle.heartbeat.remote(name, epoch)))
            await asyncio.sleep(HEARTBEAT_PERIOD_S)

    await asyncio.gather(*(beat(n) for n in names))
    changed_at = time.perf_counter()
    await handle.set_desired.remote(epoch, "drain")
    await asyncio.wait_for(asyncio.gather(*watchers), 120)
    # A watcher whose long-poll timed out before the change did not see it through the
    # long-poll: the fan-out figure is then void.
    fan_out = max(seen.values()) - changed_at if min(seen.values()) >= changed_at else None
    memory = rss_bytes(pid)
    ray.kill(handle, no_restart=True)
    return {"members": members, "register_s": summary(register), "heartbeat_s": summary(heartbeats),
            "fan_out_s": fan_out, "actor_rss_bytes": memory}


async def measure(sizes: list[int], heartbeat_seconds: float) -> list[dict]:
    results = []
    for epoch, n in enumerate(sizes, start=1):
        r = await one_size(n, heartbeat_seconds, epoch)
        results.append(r)
        print(f"{n} members: register p50/p99 {r['register_s']['p50'] * 1000:.1f}/{r['register_s']['p99'] * 1000:.1f} ms, "
              f"heartbeat p50/p99 {r['heartbeat_s']['p50'] * 1000:.1f}/{r['heartbeat_s']['p99'] * 1000:.1f} ms "
              f"({r['heartbeat_s']['n']} calls), fan-out {_ms(r['fan_out_s'])}, "
              f"actor RSS {r['actor_rss_bytes'] / 2**20:.0f} MiB", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--members", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--heartbeat-seconds", type=float, default=10.0)
    parser.add_argument("--out", default="bench/results/coordinator.json")
    args = parser.parse_args(argv)
    from controller.cluster.ray_adapter import NAMESPACE, prepare_driver_env

    prepare_driver_env()
    # A new local ray.init() cluster otherwise turns Ray's token auth on and writes
    # ~/.ray/auth_token, which then switches every later `ray start` on this machine
    # to token auth (seen here: the clusters of the next tests could not connect).
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(address="local", namespace=NAMESPACE, include_dashboard=False, logging_level="WARNING",
             _node_ip_address="127.0.0.2", num_cpus=2)
    try:
        results = asyncio.run(measure(args.members, args.heartbeat_seconds))
    finally:
        ray.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(args), "results": results}, indent=1) + "\n")
    print("\n| members | register p50 / p99 | heartbeat p50 / p99 | fan-out | actor RSS |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['members']} | {r['register_s']['p50'] * 1000:.1f} / {r['register_s']['p99'] * 1000:.1f} ms | "
              f"{r['heartbeat_s']['p50'] * 1000:.1f} / {r['heartbeat_s']['p99'] * 1000:.1f} ms | "
              f"{_ms(r['fan_out_s'])} | {r['actor_rss_bytes'] / 2**20:.0f} MiB |")
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
