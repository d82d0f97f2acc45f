"""A stalled engine, and a hung node, under steady load: how soon the cluster
says so, and what the requests sent meanwhile cost.

A cluster of two nodes (the head and one local worker, one vLLM CPU engine
each, the tiny model) takes an open-loop load of streamed completions through
the gateway (`bench/loadgen.py`, `--rate` 4 req/s). Then:

- `--rounds` times (default 3): SIGSTOP of the worker replica's EngineCore
  (`controller.testing.engine_core_pid` of its API server, the replica's `pid`
  in `/status`): the API server still answers `/health`, no token comes out.
  Measured: stall to DEGRADED on `/status` (polled every 100 ms; goal <= 3 s
  for the median, the old generation-probe path took 30 s), and the requests
  sent after the stall began that took over 5 s or failed (goal 0). The
  engine stays frozen `--hold` seconds from the stall, then gets SIGCONT (if
  the supervisor has not restarted it by then), and the next round waits for
  SERVING.
- once (`--node-rounds`): SIGSTOP of every process of the worker node
  (`controller.testing.node_pids`: its controller, Ray and engine), a hung
  machine with its engine running: freeze to DEGRADED (goal <= 3 s); SIGCONT
  `--node-hold` seconds after the freeze (Ray declares a node silent for about
  7 s dead), then wait for SERVING.

Per round it also reads the head's log: the DEGRADED transition's trigger
(`engine_stalled` expected), the gateway's `replica_stalled` events (silence,
requests moved), its `continued` events (reason, gap_ms, tokens replayed) and
`request_failed` events, and the supervisor's restarts.

    python -m bench.stall [--rounds 3] [--node-rounds 1] [--rate 4] [--max-tokens 16] [--out bench/results/stall.json]
    python -m bench.stall --replot bench/results/raw/stall.json.gz

Writes every sample to raw/NAME.json.gz beside `--out` (git-ignored), the
figures without the samples to `--out`, a Markdown summary beside it and one
PNG timeline per round. Talks to loopback only; the cluster is stopped by pid
and group.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from bench import loadgen, output
from bench.cluster import BenchCluster
from bench.failure import Load, Timeline, event_time
from controller import processes
from controller import testing as tk

SLOW_S = 5.0
AFTER_THAW_S = 3.0  # how long a thawed stall may still take to show as DEGRADED
DEGRADED_TIMEOUT_S = 60.0
SERVING_TIMEOUT_S = 600.0


def slow_after(samples: list[dict[str, Any]], at: float, slow: float = SLOW_S) -> list[dict[str, Any]]:
    """Requests sent at or after `at` that failed or took over `slow` seconds."""
    return [s for s in samples if s["planned"] + s["send_lag"] >= at
            and (s["status"] != 200 or s["latency"] is None or s["latency"] > slow)]


def log_window(events: list[dict[str, Any]], since: float, until: float) -> dict[str, Any]:
    """What the head logged between two wall-clock times about stalls and continuations."""
    inside = [e for e in events if "timestamp" in e and since <= event_time(e) <= until]

    def pick(name: str, keys: tuple[str, ...]) -> list[dict[str, Any]]:
        return [{k: e.get(k) for k in ("timestamp", *keys)} for e in inside if e.get("event") == name]

    continued = pick("continued", ("request_id", "from_replica", "to_replica", "reason", "detail",
                                   "tokens_replayed", "gap_ms"))
    return {
        "degraded_transitions": [{k: e.get(k) for k in ("timestamp", "node_id", "trigger", "reason")}
                                 for e in inside if e.get("event") == "transition" and e.get("to") == "DEGRADED"],
        "replica_stalled": pick("replica_stalled", ("replica_id", "silent_s", "moved")),
        "marked": pick("replica_marked_unhealthy", ("replica_id", "reason", "stalled")),
        "continued": continued,
        "gap_ms": loadgen.summary([e["gap_ms"] for e in continued if e.get("gap_ms") is not None]),
        "tokens_replayed": sum(e.get("tokens_replayed") or 0 for e in continued),
        "request_failed": pick("request_failed", ("request_id", "cause", "reason")),
        "engine_restarting": pick("engine_restarting", ("replica_id", "restart", "reason")),
        "generation_probe_failed": pick("generation_probe_failed", ("replica_id", "busy", "failures", "error")),
    }


def counters(status: dict[str, Any]) -> dict[str, Any]:
    g = status.get("gateway") or {}
    return {"stalls": g.get("stalls", 0), "continuations": dict(g.get("continuations") or {}),
            "requests_failed": dict(g.get("requests_failed") or {}),
            "engine_restarts": status.get("retries", {}).get("engine_restart", 0),
            "stall_suspicions_cleared": (g.get("counts") or {}).get("stall_suspicions_cleared", 0)}


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in after.items():
        if isinstance(v, dict):
            out[k] = {r: n - before[k].get(r, 0) for r, n in v.items() if n - before[k].get(r, 0)}
        else:
            out[k] = v - before[k]
    return out


def worker_of(status: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The worker node and its replica."""
    node = next(n for n in status["nodes"] if n["role"] == "worker")
    replica = next(r for r in status["replicas"] if r.get("node_id") == node["node_id"])
    return node, replica


async def one_round(c: BenchCluster, args: argparse.Namespace, kind: str, n: int) -> dict[str, Any]:
    """One stall (`engine`: the worker's EngineCore; `node`: every process of the
    worker node) under load: stall to DEGRADED, requests that suffered, back to SERVING."""
    status = await asyncio.to_thread(c.wait_state, "SERVING", SERVING_TIMEOUT_S)
    node, replica = worker_of(status)
    before = counters(status)
    if kind == "engine":
        pids = {await asyncio.to_thread(tk.engine_core_pid, replica["pid"])}
        hold = args.hold
    else:
        pids = await asyncio.to_thread(tk.node_pids, node, status["nodes"])
        hold = args.node_hold
    t0 = time.perf_counter() + 0.05
    timeline = Timeline(c.control_url, t0)
    load = Load(c.gateway_url, args.rate, args.max_tokens, args.seed + n + (100 if kind == "node" else 0), t0)
    wall_start = time.time()
    timeline.start()
    load.start()
    t_degraded = t_serving = t_cont = t_late = None
    try:
        await asyncio.sleep(args.steady)
        t_stop = timeline.now()
        processes.signal_all(pids, signal.SIGSTOP)
        try:
            try:
                t_degraded = await timeline.wait(t_stop, hold if kind == "node" else DEGRADED_TIMEOUT_S,
                                                 state="DEGRADED")
            except TimeoutError:
                pass
            await asyncio.sleep(max(0.0, t_stop + hold - timeline.now()))
        finally:
            alive = {p for p in pids if processes.is_running(p)}
            processes.signal_all(alive, signal.SIGCONT)
            t_cont = timeline.now()
        took = "-" if t_degraded is None else f"{t_degraded - t_stop:.2f}s"
        print(f"  [{kind} {n}] SIGSTOP {len(pids)} process(es) of {replica['replica_id']}: DEGRADED after {took}; "
              f"SIGCONT at {t_cont - t_stop:.1f}s ({len(alive)} still there)", flush=True)
        # Not seen while stopped: the thaw itself may still fail something (a reset
        # connection). A stall never seen at all leaves the cluster SERVING.
        await asyncio.sleep(AFTER_THAW_S)
        t_late = None if t_degraded is not None else timeline.first(t_stop, state="DEGRADED")
        if t_degraded is None and t_late is None and state_at(timeline, timeline.now()) == "SERVING":
            t_serving = t_cont
        else:
            t_serving = await timeline.wait(t_degraded or t_late, SERVING_TIMEOUT_S, state="SERVING")
        await asyncio.sleep(args.steady)
        samples = await load.finish()
    finally:
        if not load.stop_firing.is_set():
            await load.finish()
        await timeline.stop()
    status = await asyncio.to_thread(c.record)
    wall_end = time.time()
    raw = loadgen.samples_json(samples)
    slow = slow_after(raw, t_stop)
    events = log_window(c.events(), wall_start, wall_end)
    after_replica = next((r for r in status["replicas"] if r["replica_id"] == replica["replica_id"]), {})
    result = {
        "kind": kind, "round": n, "replica": replica["replica_id"], "node": node["node_id"],
        "signalled_pids": sorted(pids), "hold_s": hold,
        "marks": {"stall": t_stop, "degraded": t_degraded, "sigcont": t_cont, "degraded_after_sigcont": t_late,
                  "serving_again": t_serving},
        "stall_to_degraded_s": None if t_degraded is None else round(t_degraded - t_stop, 3),
        "degraded_before_sigcont": t_degraded is not None,
        "stall_to_degraded_after_sigcont_s": None if t_late is None else round(t_late - t_stop, 3),
        "sigcont_to_serving_s": round(t_serving - t_cont, 3),
        "requests": len(samples),
        "sent_after_stall": sum(1 for s in raw if sent_at_json(s) >= t_stop),
        "slow_or_failed_after_stall": len(slow),
        "failed": sum(1 for s in raw if s["status"] != 200),
        "ended_without_done": sum(1 for s in raw if s["status"] == 200 and not s.get("done")),
        "slow_requests": [{"sent": round(sent_at_json(s), 3), "status": s["status"],
                           "latency_s": None if s["latency"] is None else round(s["latency"], 3),
                           "replica": s.get("replica"), "error": s.get("error")} for s in slow],
        "latency": {"before": table([s for s in raw if sent_at_json(s) < t_stop]),
                    "after_stall": table([s for s in raw if sent_at_json(s) >= t_stop])},
        "counters": delta(counters(status), before),
        "replica_restarts": (after_replica.get("restarts") or 0) - (replica.get("restarts") or 0),
        "log": events,
        "timeline": timeline.changes, "samples": raw,
    }
    trig = [t["trigger"] for t in events["degraded_transitions"]]
    print(f"  [{kind} {n}] trigger {trig}; SERVING {result['sigcont_to_serving_s']:.1f}s after SIGCONT; "
          f"sent after the stall {result['sent_after_stall']}, over {SLOW_S:g}s or failed "
          f"{result['slow_or_failed_after_stall']}; counters {result['counters']}; "
          f"engine restarts {result['replica_restarts']}", flush=True)
    return result


def state_at(timeline: Timeline, t: float) -> str | None:
    """The cluster's state on /status at `t` (the last change at or before it)."""
    states = [st for at, st, _ in timeline.changes if at <= t]
    return states[-1] if states else None


def sent_at_json(s: dict[str, Any]) -> float:
    return s["planned"] + s["send_lag"]


def table(samples: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [s["latency"] for s in samples if s["status"] == 200 and s["latency"] is not None]
    return {"sent": len(samples), "ok": len(ok), **loadgen.summary(ok)}


async def run_all(c: BenchCluster, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every round; one that fails (no SERVING again, ...) is recorded with its error
    and ends the run (the cluster is not in a state to measure the next)."""
    rounds: list[dict[str, Any]] = []
    plan = [("engine", n) for n in range(1, args.rounds + 1)] + [("node", n) for n in range(1, args.node_rounds + 1)]
    for kind, n in plan:
        try:
            rounds.append(await one_round(c, args, kind, n))
        except Exception as exc:  # noqa: BLE001 - a figure, not a crash: recorded and reported
            print(f"  [{kind} {n}] round failed: {type(exc).__name__}: {exc}", flush=True)
            rounds.append({"kind": kind, "round": n, "error": f"{type(exc).__name__}: {exc}"[:2000]})
            break
    return rounds


def rounds_run(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The rounds that ran to their end."""
    return [r for r in result["rounds"] if "error" not in r]


def median(values: list[float | None]) -> float | None:
    """The median, a stall never seen (None) counted as longer than any seen one;
    None when that is the median."""
    if not values:
        return None
    m = statistics.median([math.inf if v is None else v for v in values])
    return None if math.isinf(m) else round(m, 3)


def summarize(all_rounds: list[dict[str, Any]]) -> dict[str, Any]:
    rounds = [r for r in all_rounds if "error" not in r]
    eng = [r for r in rounds if r["kind"] == "engine"]
    nod = [r for r in rounds if r["kind"] == "node"]
    return {
        "engine_rounds": len(eng),
        "engine_stall_to_degraded_s": [r["stall_to_degraded_s"] for r in eng],
        "engine_stall_to_degraded_s_median": median([r["stall_to_degraded_s"] for r in eng]),
        "engine_undetected": sum(1 for r in eng if r["stall_to_degraded_s"] is None),
        "node_freeze_to_degraded_s": [r["stall_to_degraded_s"] for r in nod],
        "node_freeze_to_degraded_s_median": median([r["stall_to_degraded_s"] for r in nod]),
        "slow_or_failed_after_stall": sum(r["slow_or_failed_after_stall"] for r in rounds),
        "engine_restarts": sum(r["counters"]["engine_restarts"] for r in rounds),
        "rounds_failed": [f"{r['kind']} {r['round']}: {r['error']}" for r in all_rounds if "error" in r],
    }


def markdown(result: dict[str, Any], plots: list[Path]) -> str:
    cfg = result["config"]
    rows = []
    for r in rounds_run(result):
        lg = r["log"]
        cont = r["counters"]["continuations"]
        trig = ", ".join(sorted({t["trigger"] for t in lg["degraded_transitions"]})) or "-"
        rows.append([r["kind"], r["round"], len(r["signalled_pids"]),
                     "-" if r["stall_to_degraded_s"] is None else f"{r['stall_to_degraded_s']:.2f}",
                     "-" if r.get("stall_to_degraded_after_sigcont_s") is None
                     else f"{r['stall_to_degraded_after_sigcont_s']:.2f}",
                     trig, f"{r['sigcont_to_serving_s']:.1f}", r["sent_after_stall"],
                     r["slow_or_failed_after_stall"], r["failed"],
                     ", ".join(f"{k} {v}" for k, v in sorted(cont.items())) or "0",
                     f"{output.ms(lg['gap_ms']['p50'] and lg['gap_ms']['p50'] / 1000)} / "
                     f"{output.ms(lg['gap_ms']['max'] and lg['gap_ms']['max'] / 1000)}",
                     r["counters"]["stalls"], r["counters"].get("stall_suspicions_cleared", "-"),
                     r["counters"]["engine_restarts"],
                     f"{output.ms(r['latency']['after_stall']['p50'])} / "
                     f"{output.ms(r['latency']['after_stall']['p99'])} / {output.ms(r['latency']['after_stall']['max'])}"])
    md = [f"# A stalled engine and a hung node under load ({cfg['rate']:g} req/s, {cfg['max_tokens']}-token "
          f"streamed completions; engine frozen {cfg['hold']:g} s, node frozen {cfg['node_hold']:g} s)\n\n",
          output.markdown_table(
              ["stall", "round", "processes stopped", "stall→DEGRADED s (while stopped)",
               "stall→DEGRADED s (only after SIGCONT)", "trigger", "SIGCONT→SERVING s",
               "sent after stall", f"of which >{SLOW_S:g} s or failed (goal 0)", "failed (all)",
               "continuations", "gateway gap_ms p50 / max", "stalls marked", "stall suspicions cleared",
               "engine restarts",
               "latency after stall p50 / p99 / max ms"], rows)]
    s = result["summary"]
    def seen(v: float | None, within: float) -> str:
        return f"not seen in {within:g} s" if v is None else f"{v:g} s"

    engine_within = max(cfg["hold"], DEGRADED_TIMEOUT_S)
    md.append(f"\nEngineCore SIGSTOP: median stall→DEGRADED **"
              f"{seen(s['engine_stall_to_degraded_s_median'], engine_within)}** over {s['engine_rounds']} rounds "
              f"({', '.join(seen(v, engine_within) for v in s['engine_stall_to_degraded_s'])}; goal <= 3 s; the "
              f"generation-probe path took 30 s). Whole-node SIGSTOP: "
              f"{', '.join(seen(v, cfg['node_hold']) for v in s['node_freeze_to_degraded_s'])} (goal <= 3 s). Requests "
              f"sent after a stall that took over {SLOW_S:g} s or failed: **{s['slow_or_failed_after_stall']}** "
              f"(goal 0). Engine restarts: {s['engine_restarts']}.\n")
    for bad in s["rounds_failed"]:
        md.append(f"\n**Round failed**: {bad}\n")
    for r in rounds_run(result):
        lg = r["log"]
        notes = []
        if r["slow_requests"]:
            notes.append("slow or failed after the stall: " + "; ".join(
                f"sent {x['sent']} s, status {x['status']}, {x['latency_s']} s, {x['replica']}"
                + (f", {x['error']}" if x["error"] else "") for x in r["slow_requests"][:10]))
        if lg["request_failed"]:
            notes.append("request_failed: " + "; ".join(f"{e['cause']}: {e['reason']}"[:200]
                                                        for e in lg["request_failed"][:5]))
        if lg["engine_restarting"]:
            notes.append("engine_restarting: " + "; ".join(f"{e['reason']}"[:200] for e in lg["engine_restarting"]))
        if notes:
            md.append(f"\n{r['kind']} round {r['round']}: " + " ".join(f"{x}." for x in notes) + "\n")
    md.append("\nTimelines: " + ", ".join(f"`{p.name}`" for p in plots) + f". Environment: {result['environment']}.\n")
    return "".join(md)


MARKS = {"stall": "SIGSTOP", "degraded": "DEGRADED on /status", "sigcont": "SIGCONT",
         "degraded_after_sigcont": "DEGRADED (after SIGCONT)", "serving_again": "SERVING again"}


def write_files(result: dict[str, Any], out: Path, raw: str | Path | None = None) -> int:
    plots = []
    labels = {"engine": "EngineCore SIGSTOP", "node": "whole worker node SIGSTOP"}
    for r in rounds_run(result):
        points = [(s["planned"] + s["send_lag"], s["latency"], s["status"] == 200) for s in r["samples"]
                  if s["latency"] is not None]
        marks = sorted((t, MARKS[k]) for k, t in r["marks"].items() if t is not None)
        plots.append(output.plot_timeline(out.with_name(f"{out.stem}-{r['kind']}{r['round']}.png"), points, marks,
                                          f"{labels[r['kind']]} under load (round {r['round']})"))
    md_text = markdown(result, plots)
    return output.publish(out, result, md_text, raw)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="EngineCore SIGSTOP rounds")
    parser.add_argument("--node-rounds", type=int, default=1, help="whole-node SIGSTOP rounds")
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--steady", type=float, default=10.0, help="seconds of load before a stall and after SERVING")
    parser.add_argument("--hold", type=float, default=10.0, help="seconds the EngineCore stays stopped")
    parser.add_argument("--node-hold", type=float, default=5.0,
                        help="seconds the whole node stays stopped (under Ray's ~7 s node death)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results/stall.json")
    parser.add_argument("--replot", metavar="RAW.json.gz",
                        help="run nothing: write the JSON, the Markdown and the plots again from a raw file")
    args = parser.parse_args(argv)
    if args.replot:
        return write_files(output.read_raw(args.replot), Path(args.out), raw=args.replot)
    if args.rounds < 0 or args.node_rounds < 0 or args.rounds + args.node_rounds == 0:
        parser.error("--rounds and --node-rounds must not be negative, nor both 0")
    if args.rate <= 0 or args.max_tokens < 1 or args.steady <= 0 or args.hold <= 0 or args.node_hold <= 0:
        parser.error("--rate, --max-tokens, --steady, --hold and --node-hold must be positive")
    result: dict[str, Any] = {"config": vars(args), "environment": output.environment()}
    with tempfile.TemporaryDirectory(prefix="bench-stall-") as tmp:
        with BenchCluster(tmp, local_workers=1, extra_args=("--wait-timeout", "900")) as c:
            c.wait_state("SERVING", 900)
            print("cluster SERVING", flush=True)
            try:
                result["rounds"] = uvloop.run(run_all(c, args))
            finally:
                # Whatever happened, nothing of the cluster stays stopped.
                processes.signal_all(processes.tree(c.pids, c.pgids), signal.SIGCONT)
    result["summary"] = summarize(result["rounds"])
    return write_files(result, Path(args.out))


if __name__ == "__main__":
    sys.exit(main())
