"""Gateway overhead: the same open-loop load sent straight to one replica and
through the gateway, interleaved in one run (request i goes direct when i is
even, through the gateway when odd), on a one-node cluster (the head alone,
one vLLM CPU engine, the tiny model), so that both paths meet the same engine
and the same noise. Reports p50/p95/p99 of end-to-end latency and TTFT for
both, and what the gateway adds.

    python -m bench.gateway [--rate 4] [--duration 60] [--max-tokens 8] [--out bench/results/gateway.json]
    python -m bench.gateway --gateway-url URL --replica-url URL [--api-key KEY]   # a running cluster

Talks to loopback only; the cluster it starts is stopped by pid and group.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from bench import loadgen
from controller import testkit as tk


def start_cluster(tmp: str) -> tuple[tk.ControllerProcess, int, int]:
    cp, rp, sp = tk.free_port(), tk.free_port(), tk.free_port()
    head = tk.start_controller(
        ["--role", "head", "--node-ip-address", "127.0.0.2", "--engine", "vllm", "--ray-port", str(rp),
         "--control-port", str(cp), "--serve-port", str(sp), "--log-format", "json", "--state-dir", f"{tmp}/state"],
        Path(tmp) / "head.log", control_port=cp)
    return head, cp, sp


async def measure(gateway_url: str, replica_url: str, args: argparse.Namespace) -> dict:
    offsets = loadgen.schedule(args.rate, args.duration, seed=args.seed, kind="poisson")
    body = {"model": "tiny", "prompt": "the gateway", "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    urls = {"direct": replica_url, "gateway": gateway_url}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        for target in urls.values():  # warm both paths (connections, the engine's first batch)
            for _ in range(3):
                s = loadgen.Sample("warmup", 0, 0, 0)
                await loadgen.send_completion(session, target, body, headers, time.perf_counter(), 60, s)

        def target_of(i: int) -> str:
            return "direct" if i % 2 == 0 else "gateway"

        async def send(i: int, planned: float, sample: loadgen.Sample) -> None:
            await loadgen.send_completion(session, urls[sample.target], body, headers, planned, 60, sample)

        samples, wall = await loadgen.run(offsets, send, target_of)
    per = {t: loadgen.report([s for s in samples if s.target == t], wall, args.rate / 2) for t in urls}
    added = {}
    for metric in ("latency_s", "ttft_s"):
        added[metric] = {q: _ms_diff(per["gateway"][metric][q], per["direct"][metric][q]) for q in ("p50", "p95", "p99")}
    return {"per_target": per, "added_ms": added, "samples": loadgen.samples_json(samples)}


def _ms_diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((a - b) * 1000, 3)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def print_table(result: dict) -> None:
    per, added = result["per_target"], result["added_ms"]
    print("\n| path | requests | ok | latency p50 / p95 / p99 (ms) | TTFT p50 / p95 / p99 (ms) |")
    print("|---|---|---|---|---|")
    for t in ("direct", "gateway"):
        r = per[t]
        lat, ttft = r["latency_s"], r["ttft_s"]
        print(f"| {t} | {r['requests']} | {r['ok']} | {_ms(lat['p50'])} / {_ms(lat['p95'])} / {_ms(lat['p99'])} | "
              f"{_ms(ttft['p50'])} / {_ms(ttft['p95'])} / {_ms(ttft['p99'])} |")
    print(f"| added by the gateway | | | {added['latency_s']['p50']} / {added['latency_s']['p95']} / "
          f"{added['latency_s']['p99']} | {added['ttft_s']['p50']} / {added['ttft_s']['p95']} / "
          f"{added['ttft_s']['p99']} |")
    behind = [t for t in per if per[t]["generator_behind"]]
    if behind:
        print(f"\nwarning: the generator fell behind its schedule ({behind}): max send lag "
              f"{max(per[t]['send_lag_s']['max'] for t in behind) * 1000:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=4.0, help="requests/s offered, both paths together")
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gateway-url")
    parser.add_argument("--replica-url")
    parser.add_argument("--api-key")
    parser.add_argument("--out", default="bench/results/gateway.json")
    args = parser.parse_args(argv)
    config = {k: v for k, v in vars(args).items() if k != "api_key"}
    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": _cpus()}
    if args.gateway_url and args.replica_url:
        result = asyncio.run(measure(args.gateway_url, args.replica_url, args))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp:
            head, cp, sp = start_cluster(tmp)
            pids, pgids = {head.pid}, set()
            try:
                s = tk.wait_cluster_state(cp, "SERVING", 600)
                pgids |= {n["ray_pgid"] for n in s["nodes"] if n.get("ray_pgid")}
                replica = s["replicas"][0]["url"]
                print(f"cluster SERVING; replica {replica}, gateway http://127.0.0.1:{sp}", flush=True)
                result = asyncio.run(measure(f"http://127.0.0.1:{sp}", replica, args))
            finally:
                tk.stop_head(head, pids, pgids)
    result = {"config": config, "environment": env, **result}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    print(f"\nraw results: {out}")
    return 0


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
