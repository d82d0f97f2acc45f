"""The cost of a failure, under steady load through the gateway.

A cluster of two nodes (the head and one worker, one vLLM CPU engine each,
the tiny model) takes an open-loop load (`bench/loadgen.py`). Then, per kill
cycle: SIGKILL every process of the worker node at once (`controller.testing.kill_node`,
as a machine failure), wait for DEGRADED on `/status`, start a new worker
(a new loopback address) and wait for SERVING, with the load running
throughout. The timeline records when `/status` (polled every 100 ms) showed
DEGRADED, when Ray counted the node dead (`alive_nodes` dropped), and when the
cluster served at full strength again. Failed requests are split by when they
were sent: before the kill (in flight on the dead replica), between the kill
and detection, after detection (goal: none). Latency percentiles before,
during (kill to SERVING again) and after.

What the clients of the streams under way on the killed replica saw: just
before each kill, `--long-streams` long streams (`--long-tokens` tokens) join
the load, and the node is killed once one of them is a quarter done on the
victim's replica (another batch if none is within 5 s, 3 at most). Every
stream (load or long) whose first replica (the gateway's `X-Replica-Id`) was
the victim and that was under way at the kill is counted; broken ones (an
error event, or no `[DONE]`: goal 0); per stream the longest gap between two
of its events (send, token chunks, end) after the kill (one under way at the
kill counted from it), p50/p99 over the streams; the gateway's own `gap_ms` and `tokens_replayed` from its
`continued` log events (tokens recomputed).

The same cycle runs once more on a cluster left with Ray's default node
health checks (`--ray-health-check ray`), to show what the controller's own
signals add. Last, a graceful drain: SIGTERM to the head under load; requests
sent before it must all complete (goal: 0 lost), later ones are refused
(503), every node reaches STOPPED and no process is left.

    python -m bench.failure [--kills 3] [--ray-kills 1] [--rate 4] [--max-tokens 16] [--long-streams 4]
                            [--long-tokens 400] [--out bench/results/failure.json]

    python -m bench.failure --replot bench/results/raw/failure.json.gz   # files again from the raw samples

Writes every sample to raw/NAME.json.gz beside `--out` (git-ignored), the
figures and timelines without the samples to `--out`, a Markdown summary
beside it, and one PNG timeline per run. Talks to loopback only; every cluster
it starts is stopped by pid and group.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
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
from controller import processes
from controller import testing as tk

REQUEST_TIMEOUT_S = 120.0
POLL_S = 0.1
NEW_WORKER_IPS = ["127.0.0.4", "127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8"]
LONG_BATCHES = 3        # batches of long streams sent before a kill, until one is caught on the victim
LONG_BATCH_WAIT_S = 5.0


class Timeline:
    """`/status` polled every 100 ms: (seconds from load start, state, alive nodes), on change."""

    def __init__(self, control_url: str, t0: float) -> None:
        self.url = control_url + "/status"
        self.t0 = t0
        self.changes: list[tuple[float, str, int | None]] = []
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                try:
                    async with session.get(self.url) as resp:
                        s = await resp.json()
                    view = (s["cluster"]["state"], s["cluster"]["alive_nodes"])
                except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError):
                    view = ("unreachable", None)
                if not self.changes or self.changes[-1][1:] != view:
                    self.changes.append((round(time.perf_counter() - self.t0, 3), *view))
                await asyncio.sleep(POLL_S)

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def first(self, after: float, state: str | None = None, alive_below: int | None = None) -> float | None:
        for t, st, alive in self.changes:
            if t < after:
                continue
            if state is not None and st == state:
                return t
            if alive_below is not None and alive is not None and alive < alive_below:
                return t
        return None

    async def wait(self, after: float, timeout: float, **what: Any) -> float:
        deadline = time.monotonic() + timeout
        while (t := self.first(after, **what)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} within {timeout:g}s; timeline: {self.changes[-5:]}")
            await asyncio.sleep(POLL_S)
        return t


class Load:
    """The steady open-loop load through the gateway, from `t0` until stopped."""

    def __init__(self, url: str, rate: float, max_tokens: int, seed: int, t0: float, horizon: float = 3600) -> None:
        self.url, self.t0 = url, t0
        self.offsets = loadgen.schedule(rate, horizon, seed=seed)
        self.body = loadgen.completion_body(max_tokens)
        self.stop_firing = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None))

        async def send(i: int, planned: float, sample: loadgen.Sample) -> None:
            await loadgen.send_completion(self._session, self.url, self.body, {}, planned, REQUEST_TIMEOUT_S, sample)

        self._task = asyncio.get_running_loop().create_task(
            loadgen.run(self.offsets, send, lambda i: "gateway", start=self.t0, stop=self.stop_firing))

    async def finish(self) -> list[loadgen.Sample]:
        """Fire no more, wait for every request sent (none is dropped)."""
        self.stop_firing.set()
        samples, _ = await self._task
        await self._session.close()
        return samples


def sent_at(s: loadgen.Sample) -> float:
    return s.planned + s.send_lag


def latency_table(samples: list[loadgen.Sample]) -> dict[str, Any]:
    ok = [s.latency for s in samples if s.ok and s.latency is not None]
    return {"sent": len(samples), "ok": len(ok), **loadgen.summary(ok)}


def moments(s: dict[str, Any]) -> list[float]:
    """A stream's events as its client saw them (s from the load's start): its send,
    every token chunk, its end."""
    times = [s["planned"] + s["send_lag"]]
    if s.get("ttft") is not None:
        t = s["planned"] + s["ttft"]
        times.append(t)
        for gap in s.get("itl") or []:
            t += gap
            times.append(t)
    if s.get("latency") is not None:
        times.append(s["planned"] + s["latency"])
    return times


def gap_at(s: dict[str, Any], at: float) -> float | None:
    """The longest wait the stream's client had between two of its events after `at`
    (the failure), a wait under way at `at` counted from `at`: the silence the
    failure cost it, not one that began before it (a starved client reading a
    backlog late)."""
    times = moments(s)
    gaps = [b - max(a, at) for a, b in zip(times, times[1:]) if b >= at]
    return max(gaps) if gaps else None


def under_way_on(s: dict[str, Any], replica_id: str, at: float) -> bool:
    """Begun by `replica_id` (its first bytes came from it) and not over at `at`."""
    end = None if s.get("latency") is None else s["planned"] + s["latency"]
    return (s.get("replica") == replica_id and s["planned"] + s["send_lag"] < at
            and (end is None or end > at))


def broken(s: dict[str, Any]) -> bool:
    """An answer the client did not get whole: an error (event or status) or no [DONE]."""
    return s["status"] != 200 or not s.get("done")


def event_time(e: dict[str, Any]) -> float:
    """A log event's wall-clock time (its ISO timestamp), as time.time() gives it."""
    return datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()


def stream_figures(samples: list[dict[str, Any]], victim_replica: str, t_kill: float,
                   continued: list[dict[str, Any]]) -> dict[str, Any]:
    """What the clients of the streams under way on the victim at the kill saw, and
    the gateway's own account (`continued` events from the victim)."""
    hit = [s for s in samples if under_way_on(s, victim_replica, t_kill)]
    gaps = [g for s in hit if (g := gap_at(s, t_kill)) is not None]
    gateway_gaps = [e["gap_ms"] / 1000 for e in continued if e.get("gap_ms") is not None]
    reasons: dict[str, int] = {}
    for e in continued:
        reasons[e.get("reason")] = reasons.get(e.get("reason"), 0) + 1
    return {
        "in_flight_on_victim": len(hit),
        "gateway_gaps": [round(g, 4) for g in gateway_gaps],
        "long_in_flight_on_victim": sum(1 for s in hit if s["target"] == "long"),
        "broken": sum(1 for s in hit if broken(s)),
        "broken_kinds": sorted({f"{s['status']} done={s.get('done')}: {(s.get('error') or '')[:80]}"
                                for s in hit if broken(s)}),
        "client_gap_s": loadgen.summary(gaps),
        "gateway_gap_s": loadgen.summary(gateway_gaps),
        "gateway_gap_null": sum(1 for e in continued if e.get("gap_ms") is None),
        "continued": len(continued), "continued_by_reason": reasons,
        "tokens_recomputed": sum(e.get("tokens_replayed") or 0 for e in continued),
        "per_stream": [{"sent": round(s["planned"] + s["send_lag"], 3), "target": s["target"],
                        "status": s["status"], "done": s.get("done"), "tokens": s["tokens"],
                        "gap_s": None if (g := gap_at(s, t_kill)) is None else round(g, 4)} for s in hit],
    }


async def long_streams(url: str, count: int, tokens: int, t0: float, at: float
                       ) -> tuple[list[loadgen.Sample], asyncio.Task]:
    """`count` long streams sent together at `at` (s from t0), to have some under
    way on the victim when it dies; returned at once, filled as they run."""
    body = loadgen.completion_body(tokens, prompt="the long stream")
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                    timeout=aiohttp.ClientTimeout(total=None))
    samples = [loadgen.Sample("long", at, 0.0, 0) for _ in range(count)]

    async def run() -> None:
        try:
            await asyncio.gather(*(loadgen.send_completion(session, url, body, {}, t0 + at, REQUEST_TIMEOUT_S, s)
                                   for s in samples))
        finally:
            await session.close()

    return samples, asyncio.get_running_loop().create_task(run())


async def kill_cycle(c: BenchCluster, new_ip: str, args: argparse.Namespace, preset: str, n: int) -> dict[str, Any]:
    t0 = time.perf_counter() + 0.05
    timeline, load = Timeline(c.control_url, t0), Load(c.gateway_url, args.rate, args.max_tokens, args.seed + n, t0)
    timeline.start()
    load.start()
    try:
        await asyncio.sleep(args.steady)
        status = await asyncio.to_thread(c.record)
        nodes = status["nodes"]
        expected = status["cluster"]["expected_nodes"]
        victim = next(n for n in nodes if n["role"] == "worker" and n["state"] == "SERVING")
        victim_replica = next((r["replica_id"] for r in status["replicas"] if r.get("node_id") == victim["node_id"]),
                              f"replica-{victim['node_id']}")
        # Found before the long streams start: the SIGKILL must land while one runs.
        pids = await asyncio.to_thread(tk.node_pids, victim, nodes)
        # The kill lands once a long stream is a quarter done on the victim's replica.
        # A batch can slip by unseen (a starved client reads a whole stream at once):
        # then another, LONG_BATCHES at most.
        quarter = max(1, args.long_tokens // 4)
        longs: list[loadgen.Sample] = []
        longs_tasks: list[asyncio.Task] = []

        def caught() -> bool:
            return any(s.replica == victim_replica and s.tokens >= quarter and s.latency is None for s in longs)

        for _ in range(LONG_BATCHES if args.long_streams else 0):
            batch, task = await long_streams(c.gateway_url, args.long_streams, args.long_tokens, t0, timeline.now())
            longs += batch
            longs_tasks.append(task)
            deadline = time.monotonic() + LONG_BATCH_WAIT_S
            while time.monotonic() < deadline and not caught() and not task.done():
                await asyncio.sleep(0.01)
            if caught():
                break
        wall_kill, t_kill = time.time(), timeline.now()
        # processes.kill_now's signals, sent here at once; its wait for the processes
        # to be gone in a thread: this loop reads the streams, and a blocked loop
        # would show as a gap the gateway did not make.
        processes.signal_all(pids, signal.SIGSTOP)
        processes.signal_all(pids, signal.SIGKILL)
        left = await asyncio.to_thread(processes.wait_gone, pids, 5.0)
        # Anything the node started since its processes were listed goes too.
        pids |= await asyncio.to_thread(tk.kill_node, victim, nodes)
        if left:
            raise RuntimeError(f"processes survived SIGKILL: {sorted(left)}")
        long_on_victim = sum(1 for s in longs if s.replica == victim_replica and s.latency is None)
        t_degraded = await timeline.wait(t_kill, 120, state="DEGRADED")
        print(f"  [{preset} {n}] SIGKILL {victim['address']} ({len(pids)} processes): DEGRADED after "
              f"{t_degraded - t_kill:.2f}s", flush=True)
        await asyncio.sleep(args.replace_after)
        t_replace = timeline.now()
        await asyncio.to_thread(c.start_worker, new_ip)
        t_serving = await timeline.wait(t_replace, 600, state="SERVING")
        t_node_dead = timeline.first(t_kill, alive_below=expected)
        print(f"  [{preset} {n}] Ray counted the node dead after "
              f"{'-' if t_node_dead is None else f'{t_node_dead - t_kill:.2f}s'}; new worker {new_ip} started, "
              f"SERVING again {t_serving - t_replace:.1f}s later", flush=True)
        await asyncio.sleep(args.steady)
        samples = await load.finish()
        await asyncio.gather(*longs_tasks)
    finally:
        if not load.stop_firing.is_set():
            await load.finish()
        await timeline.stop()
    await asyncio.to_thread(c.record)
    continued = [e for e in c.events() if e.get("event") == "continued" and e.get("from_replica") == victim_replica]
    failed_events = [{k: e.get(k) for k in ("timestamp", "request_id", "cause", "reason")} for e in c.events()
                     if e.get("event") == "request_failed" and event_time(e) >= wall_kill - 1]
    streams = stream_figures(loadgen.samples_json(samples + longs), victim_replica, t_kill, continued)
    streams["long_sent"], streams["long_on_victim_at_kill"] = len(longs), long_on_victim
    streams["request_failed_events"] = failed_events
    print(f"  [{preset} {n}] streams under way on {victim_replica}: {streams['in_flight_on_victim']} "
          f"({streams['long_in_flight_on_victim']} long), broken {streams['broken']}; client gap p50/p99 "
          f"{output.ms(streams['client_gap_s']['p50'])}/{output.ms(streams['client_gap_s']['p99'])} ms; "
          f"{streams['continued']} continued {streams['continued_by_reason']}, gateway gap_ms p50/p99 "
          f"{output.ms(streams['gateway_gap_s']['p50'])}/{output.ms(streams['gateway_gap_s']['p99'])}; "
          f"tokens recomputed {streams['tokens_recomputed']}", flush=True)
    failed = [s for s in samples if not s.ok]
    kinds = {"in_flight_at_kill": [s for s in failed if sent_at(s) < t_kill],
             "sent_before_detection": [s for s in failed if t_kill <= sent_at(s) < t_degraded],
             "sent_after_detection": [s for s in failed if sent_at(s) >= t_degraded]}
    return {
        "preset": preset, "victim": victim["address"], "victim_replica": victim_replica, "new_worker": new_ip,
        "marks": {"kill": t_kill, "degraded": t_degraded, "ray_node_dead": t_node_dead,
                  "new_worker_started": t_replace, "serving_again": t_serving},
        "kill_to_degraded_s": round(t_degraded - t_kill, 3),
        "kill_to_ray_node_dead_s": None if t_node_dead is None else round(t_node_dead - t_kill, 3),
        "new_worker_to_serving_s": round(t_serving - t_replace, 3),
        "requests": len(samples), "failed": {k: len(v) for k, v in kinds.items()},
        "failure_kinds": sorted({f"{s.status}: {(s.error or '')[:80]}" for s in failed}),
        "ended_without_done": sum(1 for s in samples if s.ok and not s.done),
        "streams": streams, "long_streams": {"samples": loadgen.samples_json(longs)},
        "latency": {"before": latency_table([s for s in samples if sent_at(s) < t_kill]),
                    "during": latency_table([s for s in samples if t_kill <= sent_at(s) < t_serving]),
                    "after": latency_table([s for s in samples if sent_at(s) >= t_serving])},
        "timeline": timeline.changes, "samples": loadgen.samples_json(samples),
    }


async def drain_run(c: BenchCluster, args: argparse.Namespace, nodes: list[dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter() + 0.05
    timeline, load = Timeline(c.control_url, t0), Load(c.gateway_url, args.rate, args.max_tokens, args.seed + 99, t0)
    timeline.start()
    load.start()
    await asyncio.sleep(args.steady)
    t_term = timeline.now()
    c.head.terminate()
    await asyncio.sleep(args.after_term)
    samples = await load.finish()
    code = await asyncio.to_thread(c.head.wait, 300)
    t_exit = timeline.now()
    await timeline.stop()
    before = [s for s in samples if sent_at(s) < t_term]
    after = [s for s in samples if sent_at(s) >= t_term]
    # The head's log holds its local workers' lines too; later workers log on their own.
    events = [e for p in [c.head.log_path, *(w.log_path for w in c.workers)] for e in tk.read_events(p)]
    stopped = {e["node_id"] for e in events if e["event"] == "transition" and e["to"] == "STOPPED"}
    live = {n["node_id"] for n in nodes if n["alive"]}
    left = processes.tree(c.pids, c.pgids)
    return {
        "marks": {"sigterm": t_term, "head_exited": t_exit},
        "exit_code": code,
        "sent_before_sigterm": len(before),
        "in_flight_at_sigterm": sum(1 for s in before if s.latency is not None and s.planned + s.latency > t_term),
        "lost": sum(1 for s in before if not s.ok),
        "sent_after_sigterm": len(after),
        "refused_after_sigterm": sum(1 for s in after if s.status in (503, -1)),
        "ok_after_sigterm": sum(1 for s in after if s.ok),
        "sigterm_to_exit_s": round(t_exit - t_term, 3),
        "nodes_stopped": f"{len(stopped & live)}/{len(live)}",
        "processes_left": sorted(left),
        "latency_before": latency_table(before),
        "timeline": timeline.changes, "samples": loadgen.samples_json(samples),
    }


def run_preset(tmp: str, preset: str, kills: int, args: argparse.Namespace, drain: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"cycles": []}
    extra = ("--ray-health-check", preset, "--wait-timeout", "900")
    with BenchCluster(tmp, local_workers=1, extra_args=extra, name=f"head-{preset}") as c:
        c.wait_state("SERVING", 900)
        print(f"[{preset}] cluster SERVING", flush=True)
        for n in range(kills):
            out["cycles"].append(uvloop.run(kill_cycle(c, NEW_WORKER_IPS[n], args, preset, n + 1)))
        if drain:
            out["drain"] = uvloop.run(drain_run(c, args, c.record()["nodes"]))
            d = out["drain"]
            print(f"[{preset}] drain: {d['lost']} lost of {d['sent_before_sigterm']} sent before SIGTERM "
                  f"({d['in_flight_at_sigterm']} in flight), {d['refused_after_sigterm']} refused after, "
                  f"exit {d['exit_code']} after {d['sigterm_to_exit_s']:.1f}s, nodes STOPPED {d['nodes_stopped']}, "
                  f"processes left {d['processes_left']}", flush=True)
    return out


def plot(path: Path, run: dict[str, Any], title: str) -> Path:
    points = [(s["planned"] + s["send_lag"], s["latency"], s["status"] == 200) for s in run["samples"]
              if s["latency"] is not None]
    labels = {"kill": "SIGKILL worker", "degraded": "DEGRADED on /status", "ray_node_dead": "Ray: node dead",
              "new_worker_started": "new worker started", "serving_again": "SERVING again",
              "sigterm": "SIGTERM head", "head_exited": "head exited"}
    marks = [(t, labels[k]) for k, t in run["marks"].items() if t is not None]
    return output.plot_timeline(path, points, sorted(marks), title)


def markdown(result: dict[str, Any], plots: list[Path]) -> str:
    md = [f"# The cost of a failure (load {result['config']['rate']:g} req/s, "
          f"{result['config']['max_tokens']}-token streamed completions)\n\n"]
    rows = []
    for preset, run in result["presets"].items():
        for i, c in enumerate(run["cycles"], 1):
            lat = c["latency"]
            rows.append([preset, i, f"{c['kill_to_degraded_s']:.2f}",
                         "-" if c["kill_to_ray_node_dead_s"] is None else f"{c['kill_to_ray_node_dead_s']:.2f}",
                         f"{c['new_worker_to_serving_s']:.1f}", c["requests"],
                         c["failed"]["in_flight_at_kill"], c["failed"]["sent_before_detection"],
                         c["failed"]["sent_after_detection"],
                         *(f"{output.ms(lat[p]['p50'])} / {output.ms(lat[p]['p99'])}" for p in ("before", "during", "after"))])
    md.append(output.markdown_table(
        ["health checks", "kill", "kill→DEGRADED s", "kill→Ray node dead s", "new worker→SERVING s", "requests",
         "failed: in flight at kill", "failed: sent before detection", "failed: sent after detection",
         "p50/p99 ms before", "p50/p99 ms during", "p50/p99 ms after"], rows))
    s = result["summary"]
    md.append(f"\nMedian kill→DEGRADED: {s['kill_to_degraded_s_median']} s (controller's checks, "
              f"{s['controller_kills']} kills); Ray's own view of the node: {s['ray_node_dead_s_median']} s "
              f"(controller preset), {s['ray_default_node_dead_s_median']} s (Ray's defaults).\n")
    md.append(streams_markdown(result))
    kinds = sorted({k for run in result["presets"].values() for c in run["cycles"] for k in c["failure_kinds"]})
    if kinds:
        md.append("\nFailure kinds seen: " + "; ".join(f"`{k}`" for k in kinds) + "\n")
    d = result["presets"]["controller"].get("drain")
    if d:
        md.append(f"\nGraceful drain (SIGTERM to the head under load): {d['sent_before_sigterm']} requests sent before "
                  f"it, {d['in_flight_at_sigterm']} in flight at it, **{d['lost']} lost**; {d['sent_after_sigterm']} sent "
                  f"after it, {d['refused_after_sigterm']} refused (503 or connection refused), {d['ok_after_sigterm']} "
                  f"served; head exit code {d['exit_code']} {d['sigterm_to_exit_s']:.1f} s after SIGTERM; nodes STOPPED "
                  f"{d['nodes_stopped']}; processes left: {len(d['processes_left'])}.\n")
    md.append("\nTimelines: " + ", ".join(f"`{p.name}`" for p in plots) + f". Environment: {result['environment']}.\n")
    return "".join(md)


def streams_markdown(result: dict[str, Any]) -> str:
    """The streams under way on the killed replica: what their clients saw."""
    rows = []
    for preset, run in result["presets"].items():
        for i, c in enumerate(run["cycles"], 1):
            st = c.get("streams")
            if st is None:  # a raw file from before these figures
                continue
            cg, gg = st["client_gap_s"], st["gateway_gap_s"]
            rows.append([preset, i, f"{st['in_flight_on_victim']} ({st['long_in_flight_on_victim']} long)",
                         st["broken"], f"{output.ms(cg['p50'])} / {output.ms(cg['p99'])} / {output.ms(cg['max'])}",
                         f"{output.ms(gg['p50'])} / {output.ms(gg['p99'])} (n={gg['n']}, null {st['gateway_gap_null']})",
                         ", ".join(f"{k} {v}" for k, v in sorted(st["continued_by_reason"].items())) or "0",
                         st["tokens_recomputed"], c.get("ended_without_done", "-")])
    if not rows:
        return ""
    s = result["summary"]
    return ("\nStreams under way on the killed replica (begun by it, its `X-Replica-Id`, and not over at the "
            "kill; long streams of " f"{result['config'].get('long_tokens')} tokens join the load just before each "
            "kill). Client gap: per stream, the longest wait between two of its events (send, token chunks, end) "
            "after the kill (one under way at the kill counted from it). Gateway gap: `gap_ms` of its `continued` events from the victim (last byte "
            "before the failure to the first after; null: nothing written after).\n\n"
            + output.markdown_table(
                ["health checks", "kill", "streams in flight on victim", "broken (goal 0)",
                 "client gap p50 / p99 / max ms", "gateway gap_ms p50 / p99", "continuations by reason",
                 "tokens recomputed", "all streams: 200 without [DONE]"], rows)
            + f"\nAll kills: {s.get('streams_in_flight_on_victim')} streams under way on the killed replica, "
              f"**{s.get('streams_broken')} broken**; client gap p50/p99 {output.ms(s.get('client_gap_s_p50'))} / "
              f"{output.ms(s.get('client_gap_s_p99'))} ms; gateway gap_ms p50/p99 "
              f"{output.ms(s.get('gateway_gap_s_p50'))} / {output.ms(s.get('gateway_gap_s_p99'))} ms; "
              f"{s.get('tokens_recomputed')} tokens recomputed.\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=3, help="kill cycles with the controller's health checks")
    parser.add_argument("--ray-kills", type=int, default=1, help="kill cycles with Ray's default health checks")
    parser.add_argument("--rate", type=float, default=4.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--steady", type=float, default=20.0, help="seconds of load before a kill and after recovery")
    parser.add_argument("--replace-after", type=float, default=5.0, help="seconds after DEGRADED to start a new worker")
    parser.add_argument("--after-term", type=float, default=10.0, help="seconds of load after SIGTERM in the drain run")
    parser.add_argument("--no-drain", action="store_true")
    parser.add_argument("--long-streams", type=int, default=4,
                        help="long streams sent just before each kill (0: none; the kill then waits for nothing)")
    parser.add_argument("--long-tokens", type=int, default=400, help="tokens of each long stream")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results/failure.json")
    parser.add_argument("--replot", metavar="RAW.json.gz",
                        help="run nothing: write the JSON, the Markdown and the plots again from a raw file")
    args = parser.parse_args(argv)
    if args.replot:
        return write_files(output.read_raw(args.replot), Path(args.out), raw=args.replot)
    if not 1 <= args.kills <= len(NEW_WORKER_IPS) or not 0 <= args.ray_kills <= len(NEW_WORKER_IPS):
        parser.error(f"--kills must be 1 to {len(NEW_WORKER_IPS)}, --ray-kills 0 to {len(NEW_WORKER_IPS)}")
    if args.rate <= 0 or args.max_tokens < 1 or args.steady <= 0:
        parser.error("--rate, --max-tokens and --steady must be positive")
    result: dict[str, Any] = {"config": vars(args), "environment": output.environment(), "presets": {}}
    with tempfile.TemporaryDirectory(prefix="bench-failure-") as tmp:
        result["presets"]["controller"] = run_preset(tmp, "controller", args.kills, args, drain=not args.no_drain)
        if args.ray_kills:
            result["presets"]["ray"] = run_preset(tmp, "ray", args.ray_kills, args, drain=False)
    ctl = result["presets"]["controller"]["cycles"]
    ray = result["presets"].get("ray", {}).get("cycles", [])

    def med(values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None]
        return round(statistics.median(values), 3) if values else None

    all_cycles = ctl + ray
    client_gaps = [x["gap_s"] for c in all_cycles for x in c["streams"]["per_stream"] if x["gap_s"] is not None]
    events_gaps = [g for c in all_cycles for g in c["streams"].get("gateway_gaps", [])]
    result["summary"] = {
        "controller_kills": len(ctl),
        "kill_to_degraded_s_median": med([c["kill_to_degraded_s"] for c in ctl]),
        "ray_node_dead_s_median": med([c["kill_to_ray_node_dead_s"] for c in ctl]),
        "ray_default_kill_to_degraded_s_median": med([c["kill_to_degraded_s"] for c in ray]),
        "ray_default_node_dead_s_median": med([c["kill_to_ray_node_dead_s"] for c in ray]),
        "failed_after_detection": sum(c["failed"]["sent_after_detection"] for c in ctl + ray),
        "drain_lost": result["presets"]["controller"].get("drain", {}).get("lost"),
        "streams_in_flight_on_victim": sum(c["streams"]["in_flight_on_victim"] for c in all_cycles),
        "streams_broken": sum(c["streams"]["broken"] for c in all_cycles),
        "client_gap_s_p50": loadgen.percentile(client_gaps, 50),
        "client_gap_s_p99": loadgen.percentile(client_gaps, 99),
        "gateway_gap_s_p50": loadgen.percentile(events_gaps, 50),
        "gateway_gap_s_p99": loadgen.percentile(events_gaps, 99),
        "tokens_recomputed": sum(c["streams"]["tokens_recomputed"] for c in all_cycles),
    }
    return write_files(result, Path(args.out))


def write_files(result: dict[str, Any], out: Path, raw: str | Path | None = None) -> int:
    """The plots, the Markdown, the JSON without samples and (unless `raw` names the
    one these came from) the raw samples."""
    plots = []
    for preset, run in result["presets"].items():
        for i, c in enumerate(run["cycles"], 1):
            plots.append(plot(out.with_name(f"{out.stem}-{preset}-kill{i}.png"), c,
                              f"Worker node SIGKILL under load ({preset} health checks, kill {i})"))
        if run.get("drain"):
            plots.append(plot(out.with_name(f"{out.stem}-drain.png"), run["drain"], "SIGTERM to the head under load"))
    md_text = markdown(result, plots)
    return output.publish(out, result, md_text, raw)


if __name__ == "__main__":
    sys.exit(main())
