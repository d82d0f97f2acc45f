"""Latency under load: a rate sweep against the gateway, up to saturation.

For each offered rate, one open-loop run (`bench/loadgen.py`: a seeded
Poisson schedule fixed before the run, latency from the planned send time) of
streaming completions of `--max-tokens` tokens. Prints a table per rate
(achieved rate, failures, p50/p95/p99/max of end-to-end latency, TTFT and time
per output token) and the saturation point: the first rate where the server
no longer keeps up (it completes under 90% of the offered rate, more than 1%
of requests fail, or the median latency is over twice the lightest rate's).

When it starts its own cluster (a one-node cluster: the head, one vLLM CPU
engine, the tiny model) it also reports the controller's share of the start:
start command to SERVING, minus Ray's start and the engine's start.

    python -m bench.sweep [--rates 4 8 16 32 64 128] [--duration 30] [--max-tokens 16] [--out bench/results/sweep.json]
    python -m bench.sweep --gateway-url URL [--api-key KEY]      # a running cluster

    python -m bench.sweep --replot bench/results/raw/sweep.json.gz   # files again from the raw samples

Writes every sample to raw/NAME.json.gz beside `--out` (git-ignored), the
figures without the samples (percentiles per rate) to `--out`, a Markdown
summary beside it and a latency CDF per rate (PNG). Talks to loopback only;
the cluster it starts is stopped by pid and group.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench import loadgen, output
from bench.cluster import BenchCluster

REQUEST_TIMEOUT_S = 120.0


async def sweep(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    body = loadgen.completion_body(args.max_tokens)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    runs = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        for _ in range(4):  # warm the connections and the engine's first batches
            await loadgen.send_completion(session, url, body, headers, time.perf_counter(), 60,
                                          loadgen.Sample("warmup", 0, 0, 0))

        async def send(i: int, planned: float, sample: loadgen.Sample) -> None:
            await loadgen.send_completion(session, url, body, headers, planned, REQUEST_TIMEOUT_S, sample)

        for rate in args.rates:
            offsets = loadgen.schedule(rate, args.duration, seed=args.seed)
            samples, wall = await loadgen.run(offsets, send, lambda i: "gateway")
            report = loadgen.report(samples, wall, rate)
            runs.append({"rate": rate, "report": report, "samples": loadgen.samples_json(samples)})
            print(f"rate {rate:g}/s: {report['ok']}/{report['requests']} ok, achieved {report['achieved_rate']:.2f}/s, "
                  f"p50 {output.ms(report['latency_s']['p50'])} ms, p99 {output.ms(report['latency_s']['p99'])} ms",
                  flush=True)
            await asyncio.sleep(2)  # let the engine settle between rates
    return runs


def saturation(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The first rate where the server stops keeping up, and the last one where it did."""
    base = runs[0]["report"]["latency_s"]["p50"] if runs else None
    last_ok = None
    for run in runs:
        r = run["report"]
        failed = r["requests"] - r["ok"]
        reasons = []
        if r["achieved_rate"] is not None and r["achieved_rate"] < 0.9 * r["offered_rate"]:
            reasons.append(f"achieved {r['achieved_rate']:.2f}/s of {r['offered_rate']:g}/s offered")
        if r["requests"] and failed / r["requests"] > 0.01:
            reasons.append(f"{failed} of {r['requests']} failed")
        p50 = r["latency_s"]["p50"]
        if base and p50 and p50 > 2 * base:
            reasons.append(f"median latency {p50 * 1000:.0f} ms, over twice {base * 1000:.0f} ms at the lightest rate")
        if reasons:
            return {"saturated_at": run["rate"], "last_sustained": last_ok, "why": "; ".join(reasons)}
        last_ok = run["rate"]
    return {"saturated_at": None, "last_sustained": last_ok, "why": "not reached: offer higher rates"}


def start_costs(c: BenchCluster, status: dict[str, Any]) -> dict[str, Any]:
    """Start command to SERVING, split into Ray's start, the engine's and the rest (ours)."""
    events = c.events()

    def at(event: dict[str, Any]) -> float:
        return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()

    serving = next(e for e in events if e["event"] == "transition" and e["to"] == "SERVING")
    ray_from = next(e for e in events if e["event"] == "ray_head_starting")
    ray_to = next(e for e in events if e["event"] == "ray_started")
    total = at(serving) - c.started_at
    ray_s = at(ray_to) - at(ray_from)
    engine_s = max(r["ready_s"] for r in status["replicas"])
    return {"start_to_serving_s": round(total, 3), "ray_start_s": round(ray_s, 3), "engine_start_s": engine_s,
            "controller_s": round(total - ray_s - engine_s, 3)}


def markdown(result: dict[str, Any], cdf: Path) -> str:
    rows = []
    for run in result["runs"]:
        r = run["report"]
        rows.append([f"{run['rate']:g}", f"{r['achieved_rate']:.2f}", f"{r['ok']}/{r['requests']}",
                     ", ".join(f"{k}: {v}" for k, v in r["failures"].items()) or "0",
                     *(output.ms(r["latency_s"][q]) for q in ("p50", "p95", "p99", "max")),
                     *(output.ms(r["ttft_s"][q]) for q in ("p50", "p99")),
                     *(output.ms(r["tpot_s"][q]) for q in ("p50", "p99")),
                     f"{r['send_lag_s']['p99'] * 1000:.1f} / {r['send_lag_s']['max'] * 1000:.1f}"
                     + (" (behind)" if r["generator_behind"] else "")])
    md = [f"# Rate sweep ({result['config']['max_tokens']}-token streamed completions, "
          f"{result['config']['duration']:g} s per rate)\n",
          output.markdown_table(["offered/s", "achieved/s", "ok", "failed", "e2e p50 ms", "e2e p95 ms",
                                 "e2e p99 ms", "e2e max ms", "TTFT p50 ms", "TTFT p99 ms", "TPOT p50 ms",
                                 "TPOT p99 ms", "send lag p99 / max ms"], rows)]
    s = result["saturation"]
    md.append(f"\nSaturation: {s['saturated_at']} req/s ({s['why']}); last sustained rate: {s['last_sustained']} req/s.\n")
    if result.get("start"):
        st = result["start"]
        md.append(f"\nStart: {st['start_to_serving_s']:.2f} s from the start command to SERVING = Ray start "
                  f"{st['ray_start_s']:.2f} s + engine start {st['engine_start_s']:.2f} s + controller "
                  f"{st['controller_s']:.2f} s.\n")
    md.append(f"\nLatency CDF per rate: `{cdf.name}`. Environment: {result['environment']}.\n")
    return "".join(md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load per rate")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gateway-url")
    parser.add_argument("--api-key")
    parser.add_argument("--out", default="bench/results/sweep.json")
    parser.add_argument("--replot", metavar="RAW.json.gz",
                        help="run nothing: write the JSON, the Markdown and the plot again from a raw file")
    args = parser.parse_args(argv)
    if args.replot:
        return write_files(output.read_raw(args.replot), Path(args.out), raw=args.replot)
    if any(r <= 0 for r in args.rates) or args.duration <= 0 or args.max_tokens < 1:
        parser.error("rates, --duration and --max-tokens must be positive")
    args.rates = sorted(args.rates)
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "api_key"},
                              "environment": output.environment()}
    if args.gateway_url:
        result["runs"] = uvloop.run(sweep(args.gateway_url, args))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp, BenchCluster(tmp) as c:
            status = c.wait_state("SERVING", 600)
            result["start"] = start_costs(c, status)
            print(f"cluster SERVING: {result['start']}", flush=True)
            result["runs"] = uvloop.run(sweep(c.gateway_url, args))
    result["saturation"] = saturation(result["runs"])
    return write_files(result, Path(args.out))


def write_files(result: dict[str, Any], out: Path, raw: str | Path | None = None) -> int:
    """The plot, the Markdown, the JSON without samples and (unless `raw` names the
    one these came from) the raw samples."""
    cdf = output.plot_cdf(out.with_name(out.stem + "-cdf.png"),
                          {f"{run['rate']:g} req/s": [s["latency"] for s in run["samples"]
                                                      if s["status"] == 200 and s["latency"] is not None]
                           for run in result["runs"]},
                          "End-to-end latency per offered rate (through the gateway)", "latency (ms)")
    md_text = markdown(result, cdf)
    return output.publish(out, result, md_text, raw, plot=cdf)


if __name__ == "__main__":
    sys.exit(main())
