"""False positives of the stall watch: a busy engine is not a stalled one.

A one-node cluster (the head alone, one vLLM CPU engine, the tiny model) takes
two open-loop loads through the gateway (`bench/loadgen.py`), `--duration`
seconds each (default 600):

1. saturation: `--rate` req/s (default 128, the saturating rate of
   `bench/sweep.py`, where p99 is about 2.5 s on this machine) of short
   streamed completions (`--max-tokens` 16);
2. long prompts: `--long-rate` req/s (default 4) of prompts near the model's
   context length (`--prompt-tokens` 900 of the tiny model's 1,024; each prompt
   distinct, so no prefix is cached; the words per token are measured first
   from the engine's own `usage.prompt_tokens`) with few tokens out
   (`--long-max-tokens` 8). The cluster serves the tiny model with a shorter
   context than the model's (vLLM's `max_model_len` in /v1/models: 512):
   the prompts are then as long as that context allows.

Per phase it reports what must stay zero, replicas marked stalled (`/status`
gateway.stalls) and engine restarts (`retries.engine_restart`), and what the
load saw: continuations, failed requests, latency p50/p99. From the head's log:
stall suspicions the engine's counters cleared (gateway counts
`stall_suspicions_cleared`), replicas marked unhealthy, DEGRADED transitions.

    python -m bench.false_stalls [--duration 600] [--rate 128] [--long-rate 4] [--out bench/results/false_stalls.json]
    python -m bench.false_stalls --duration 60        # a short smoke run
    python -m bench.false_stalls --replot bench/results/raw/false_stalls.json.gz

Writes every sample to raw/NAME.json.gz beside `--out` (git-ignored), the
figures without the samples to `--out` and a Markdown summary beside it. Talks
to loopback only; the cluster is stopped by pid and group.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from bench import loadgen, output
from bench.cluster import BenchCluster
from bench.stall import counters, delta
from bench.failure import event_time
from controller.engines.tiny_model import MAX_POSITIONS, WORDS

REQUEST_TIMEOUT_S = 120.0


def prompt(words: int, seed: int) -> str:
    """`words` words of the tiny model's vocabulary, one sequence per seed."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


async def prompt_tokens(session: aiohttp.ClientSession, url: str, text: str) -> int | None:
    """The engine's count of a prompt's tokens; None when it is refused as too long (400)."""
    body = loadgen.completion_body(1, prompt=text, stream=False)
    async with session.post(url + "/v1/completions", json=body) as resp:
        data = await resp.json(content_type=None)
        if resp.status == 400:
            return None
        if resp.status != 200:
            raise RuntimeError(f"prompt of {len(text.split())} words refused: {resp.status} {data}")
        return data["usage"]["prompt_tokens"]


async def calibrate(url: str, target: int, limit: int) -> dict[str, Any]:
    """Words per prompt for about `target` tokens (never over `limit`), from the
    engine's own count of a few prompts."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        words = target
        for _ in range(6):
            counts = [await prompt_tokens(session, url, prompt(words, -1 - i)) for i in range(3)]
            if None in counts:  # over the context: fewer words
                words = int(words * 0.8)
                continue
            mean = sum(counts) / len(counts)
            if abs(mean - target) <= target * 0.02 and max(counts) <= limit:
                break
            words = max(1, int(words * target / mean))
            if max(counts) > limit:
                words = int(words * 0.97)
        checks = [await prompt_tokens(session, url, prompt(words, 10_000 + i)) for i in range(5)]
        if None in checks or max(checks) > limit:
            raise RuntimeError(f"no prompt length found near {target} tokens under {limit}: {words} words "
                               f"give {checks}")
    return {"words": words, "target_tokens": target, "check_prompt_tokens": checks}


async def phase(url: str, name: str, rate: float, duration: float, max_tokens: int, seed: int,
                words: int | None) -> dict[str, Any]:
    offsets = loadgen.schedule(rate, duration, seed=seed)
    fixed = loadgen.completion_body(max_tokens, prompt="the cluster")
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        async def send(i: int, planned: float, sample: loadgen.Sample) -> None:
            body = fixed if words is None else loadgen.completion_body(max_tokens, prompt=prompt(words, seed * 1_000_000 + i))
            await loadgen.send_completion(session, url, body, {}, planned, REQUEST_TIMEOUT_S, sample)

        samples, wall = await loadgen.run(offsets, send, lambda i: name)
    return {"report": loadgen.report(samples, wall, rate), "wall_s": round(wall, 3),
            "ended_without_done": sum(1 for s in samples if s.ok and not s.done),
            "samples": loadgen.samples_json(samples)}


def log_window(events: list[dict[str, Any]], since: float, until: float) -> dict[str, Any]:
    inside = [e for e in events if "timestamp" in e and since <= event_time(e) <= until]

    def pick(name: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
        return [{k: e.get(k) for k in ("timestamp", *keys)} for e in inside if e.get("event") == name]

    return {
        "transitions": [{k: e.get(k) for k in ("timestamp", "node_id", "from", "to", "trigger", "reason")}
                        for e in inside if e.get("event") == "transition"],
        "replica_stalled": pick("replica_stalled", ("replica_id", "silent_s", "moved")),
        "marked": pick("replica_marked_unhealthy", ("replica_id", "reason", "stalled")),
        "continued": pick("continued", ("request_id", "from_replica", "to_replica", "reason", "detail", "gap_ms")),
        "request_failed": pick("request_failed", ("request_id", "cause", "reason")),
        "engine_restarting": pick("engine_restarting", ("replica_id", "restart", "reason")),
        "generation_probe_failed": pick("generation_probe_failed", ("replica_id", "busy", "failures", "error")),
    }


def status_figures(status: dict[str, Any]) -> dict[str, Any]:
    g = status.get("gateway") or {}
    return {**counters(status), "stall_suspicions_cleared": (g.get("counts") or {}).get("stall_suspicions_cleared", 0),
            "state": status["cluster"]["state"]}


async def served_context(url: str) -> int | None:
    """The context the engine serves (vLLM's `max_model_len` in /v1/models): the
    cluster may serve the tiny model with less than its MAX_POSITIONS."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(url + "/v1/models") as resp:
            data = await resp.json(content_type=None)
    lengths = [m.get("max_model_len") for m in data.get("data") or [] if m.get("max_model_len")]
    return min(lengths) if lengths else None


async def measure(c: BenchCluster, args: argparse.Namespace) -> dict[str, Any]:
    context = await served_context(c.gateway_url) or MAX_POSITIONS
    limit = context - args.long_max_tokens
    # Near the served context: what was asked, or as close as the context allows
    # (a margin of 8 tokens for the tokenizer's count of a sequence of words).
    target = min(args.prompt_tokens, limit - 8)
    if target != args.prompt_tokens:
        print(f"the engine serves a context of {context} tokens (the model's own: {MAX_POSITIONS}): prompts of "
              f"{target} tokens, not {args.prompt_tokens}", flush=True)
    cal = await calibrate(c.gateway_url, target, limit)
    cal.update(served_context=context, model_positions=MAX_POSITIONS, asked_tokens=args.prompt_tokens)
    print(f"long prompts: {cal['words']} words, {cal['check_prompt_tokens']} tokens (engine's count)", flush=True)
    plan = [("saturation", args.rate, args.max_tokens, None), ("long_prompts", args.long_rate, args.long_max_tokens,
                                                               cal["words"])]
    phases = {}
    for i, (name, rate, max_tokens, words) in enumerate(plan):
        before = status_figures(await asyncio.to_thread(c.status))
        since = time.time()
        run = await phase(c.gateway_url, name, rate, args.duration, max_tokens, args.seed + i, words)
        await asyncio.sleep(1)  # the last requests' log lines
        after = status_figures(await asyncio.to_thread(c.status))
        until = time.time()
        d = delta({k: v for k, v in after.items() if k != "state"}, {k: v for k, v in before.items() if k != "state"})
        events = log_window(c.events(), since, until)
        run.update(config={"rate": rate, "max_tokens": max_tokens, "prompt_words": words}, counters=d,
                   state_after=after["state"], log=events)
        r = run["report"]
        print(f"[{name}] {r['requests']} sent, {r['ok']} ok, failures {r['failures']}; p50/p99 "
              f"{output.ms(r['latency_s']['p50'])}/{output.ms(r['latency_s']['p99'])} ms; stalls {d['stalls']}, "
              f"engine restarts {d['engine_restarts']}, continuations {d['continuations']}, suspicions cleared "
              f"{d['stall_suspicions_cleared']}; state {after['state']}", flush=True)
        phases[name] = run
    return {"calibration": cal, "phases": phases}


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = []
    for name, p in result["phases"].items():
        r, d, pc = p["report"], p["counters"], p["config"]
        lat, ttft = r["latency_s"], r["ttft_s"]
        what = (f"{pc['max_tokens']}-token completions" if pc["prompt_words"] is None else
                f"~{result['calibration']['target_tokens']}-token prompts, {pc['max_tokens']} tokens out")
        rows.append([name, f"{pc['rate']:g} ({what})", f"{r['achieved_rate']:.2f}", f"{r['ok']}/{r['requests']}",
                     ", ".join(f"{k}: {v}" for k, v in sorted(r["failures"].items())) or "0",
                     d["stalls"], d["engine_restarts"],
                     ", ".join(f"{k} {v}" for k, v in sorted(d["continuations"].items())) or "0",
                     d["stall_suspicions_cleared"],
                     " / ".join(output.ms(lat[q]) for q in ("p50", "p99", "max")),
                     " / ".join(output.ms(ttft[q]) for q in ("p50", "p99")),
                     f"{output.ms(r['send_lag_s']['p99'])}" + (" (behind)" if r["generator_behind"] else ""),
                     len([t for t in p["log"]["transitions"] if t["to"] == "DEGRADED"])])
    md = [f"# Stall false positives on a busy engine ({cfg['duration']:g} s per phase, one node)\n\n",
          output.markdown_table(
              ["phase", "offered req/s", "achieved req/s", "ok", "failed", "replicas marked stalled (goal 0)",
               "engine restarts (goal 0)", "continuations", "stall suspicions cleared by the counters",
               "latency p50 / p99 / max ms", "TTFT p50 / p99 ms", "send lag p99 ms", "DEGRADED transitions"], rows)]
    cal = result["calibration"]
    md.append(f"\nLong prompts: {cal['words']} words of the tiny vocabulary, {cal['check_prompt_tokens']} prompt "
              f"tokens by the engine's count (target {cal['target_tokens']}; the engine serves a context of "
              f"{cal.get('served_context')} tokens, the model's own is {MAX_POSITIONS}); every prompt distinct.\n")
    for name, p in result["phases"].items():
        lg = p["log"]
        notes = [f"{len(lg[k])} {k}" for k in ("marked", "replica_stalled", "request_failed", "engine_restarting",
                                                "generation_probe_failed") if lg[k]]
        if notes:
            md.append(f"\n{name}: " + ", ".join(notes) + ". First: " + "; ".join(
                json.dumps(lg[k][0])[:300] for k in ("marked", "request_failed", "engine_restarting",
                                                     "generation_probe_failed") if lg[k]) + "\n")
    return "".join(md) + f"\nEnvironment: {result['environment']}.\n"


def write_files(result: dict[str, Any], out: Path, raw: str | Path | None = None) -> int:
    md_text = markdown(result)
    return output.publish(out, result, md_text, raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=600.0, help="seconds per phase")
    parser.add_argument("--rate", type=float, default=128.0, help="req/s of the saturation phase")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens out in the saturation phase")
    parser.add_argument("--long-rate", type=float, default=4.0, help="req/s of the long-prompt phase")
    parser.add_argument("--prompt-tokens", type=int, default=900, help="prompt tokens in the long-prompt phase")
    parser.add_argument("--long-max-tokens", type=int, default=8, help="tokens out in the long-prompt phase")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results/false_stalls.json")
    parser.add_argument("--replot", metavar="RAW.json.gz",
                        help="run nothing: write the JSON and the Markdown again from a raw file")
    args = parser.parse_args(argv)
    if args.replot:
        return write_files(output.read_raw(args.replot), Path(args.out), raw=args.replot)
    if min(args.duration, args.rate, args.long_rate) <= 0 or min(args.max_tokens, args.long_max_tokens) < 1:
        parser.error("--duration, the rates and the token counts must be positive")
    if not 1 <= args.prompt_tokens <= MAX_POSITIONS - args.long_max_tokens:
        parser.error(f"--prompt-tokens must leave room for --long-max-tokens in {MAX_POSITIONS}")
    result: dict[str, Any] = {"config": vars(args), "environment": output.environment()}
    with tempfile.TemporaryDirectory(prefix="bench-false-stalls-") as tmp, BenchCluster(tmp) as c:
        c.wait_state("SERVING", 900)
        print(f"cluster SERVING; gateway {c.gateway_url}", flush=True)
        result.update(uvloop.run(measure(c, args)))
    phases = result["phases"].values()
    result["summary"] = {"stalls": sum(p["counters"]["stalls"] for p in phases),
                         "engine_restarts": sum(p["counters"]["engine_restarts"] for p in phases),
                         "failed": sum(p["report"]["requests"] - p["report"]["ok"] for p in phases)}
    return write_files(result, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
