"""Gateway overhead: the same open-loop load sent straight to one replica and
through the gateway, interleaved in one run (request i goes direct when i is
even, through the gateway when odd), on a one-node cluster (the head alone,
one vLLM CPU engine, the tiny model), so that both paths meet the same engine
and the same noise. Reports p50/p95/p99 of end-to-end latency and TTFT for
both, and what the gateway adds.

    python -m bench.gateway [--rate 4] [--duration 60] [--max-tokens 8] [--out bench/results/gateway.json]
    python -m bench.gateway --gateway-url URL --replica-url URL [--api-key KEY]   # a running cluster

    python -m bench.gateway --replot bench/results/raw/gateway.json.gz   # files again from the raw samples

Writes every sample to raw/NAME.json.gz beside `--out` (git-ignored), the
figures without the samples to `--out`, a Markdown table beside it and both
paths' latency CDFs (PNG). Talks to loopback only; the cluster it starts is
stopped by pid and group.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import uvloop

from bench import loadgen, output
from bench.cluster import BenchCluster


async def measure(gateway_url: str, replica_url: str, args: argparse.Namespace) -> dict:
    offsets = loadgen.schedule(args.rate, args.duration, seed=args.seed, kind="poisson")
    body = loadgen.completion_body(args.max_tokens, prompt="the gateway")
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


def markdown(result: dict) -> str:
    per, added = result["per_target"], result["added_ms"]
    cfg = result["config"]
    rows = []
    for t in ("direct", "gateway"):
        r = per[t]
        lat, ttft = r["latency_s"], r["ttft_s"]
        rows.append([t, r["requests"], r["ok"], " / ".join(output.ms(lat[q]) for q in ("p50", "p95", "p99")),
                     " / ".join(output.ms(ttft[q]) for q in ("p50", "p95", "p99"))])
    rows.append(["added by the gateway", "", "", " / ".join(str(added["latency_s"][q]) for q in ("p50", "p95", "p99")),
                 " / ".join(str(added["ttft_s"][q]) for q in ("p50", "p95", "p99"))])
    md = (f"# Gateway overhead: direct vs through the gateway, interleaved ({cfg['rate']:g} req/s, "
          f"{cfg['duration']:g} s, {cfg['max_tokens']}-token streamed completions)\n\n"
          + output.markdown_table(["path", "requests", "ok", "latency p50 / p95 / p99 (ms)",
                                   "TTFT p50 / p95 / p99 (ms)"], rows))
    behind = [t for t in per if per[t]["generator_behind"]]
    if behind:
        md += (f"\nwarning: the generator fell behind its schedule ({behind}): max send lag "
               f"{max(per[t]['send_lag_s']['max'] for t in behind) * 1000:.1f} ms\n")
    return md + f"\nEnvironment: {result['environment']}.\n"


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
    parser.add_argument("--replot", metavar="RAW.json.gz",
                        help="run nothing: write the JSON, the Markdown and the plot again from a raw file")
    args = parser.parse_args(argv)
    if args.replot:
        return write_files(output.read_raw(args.replot), Path(args.out), raw=args.replot)
    config = {k: v for k, v in vars(args).items() if k != "api_key"}
    if args.gateway_url and args.replica_url:
        result = uvloop.run(measure(args.gateway_url, args.replica_url, args))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-gateway-") as tmp, BenchCluster(tmp) as c:
            s = c.wait_state("SERVING", 600)
            replica = s["replicas"][0]["url"]
            print(f"cluster SERVING; replica {replica}, gateway {c.gateway_url}", flush=True)
            result = uvloop.run(measure(c.gateway_url, replica, args))
    result = {"config": config, "environment": output.environment(), **result}
    return write_files(result, Path(args.out))


def write_files(result: dict, out: Path, raw: str | Path | None = None) -> int:
    """The plot, the Markdown, the JSON without samples and (unless `raw` names the
    one these came from) the raw samples."""
    cdf = output.plot_cdf(out.with_name(out.stem + "-cdf.png"),
                          {t: [x["latency"] for x in result["samples"] if x["target"] == t and x["status"] == 200]
                           for t in ("direct", "gateway")},
                          "End-to-end latency: straight to the replica vs through the gateway", "latency (ms)")
    md_text = markdown(result)
    return output.publish(out, result, md_text, raw, plot=cdf)


if __name__ == "__main__":
    sys.exit(main())
