"""Engine figures on a real one-machine cluster (head + 2 local workers,
`--engine vllm`, the tiny model, one replica per node):

- time from starting the head to the first answered completion (a replica's
  OpenAI-compatible API), one figure per cluster start;
- time from SIGKILL of one replica's engine to SERVING again on /status
  (the replica actor restarts it), several kills per cluster.

    python -m bench.engines [--starts 3] [--kills 3] [--out bench/results/engines.json]

Talks to loopback only; every cluster it starts is stopped by pid and group.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from controller import processes
from controller import testing as tk


def first_completion(control_port: int, t0: float, timeout: float = 600) -> float:
    def answered():
        s = tk.status(control_port)
        ready = [r for r in s["replicas"] if r["state"] == "READY"]
        if not ready:
            return None
        return tk.complete(ready[0]["url"], "hello", max_tokens=1, timeout=30)["usage"]["completion_tokens"] == 1
    tk.wait_for(answered, timeout, interval=0.5, what="a first completion")
    return time.monotonic() - t0


def kill_engine_and_time_recovery(control_port: int) -> tuple[float, float]:
    s = tk.status(control_port)
    victim = next(r for r in s["replicas"] if r["node_id"].startswith("worker-"))
    t = time.monotonic()
    processes.kill_now(processes.tree({victim["pid"]}, {victim["pid"]}))
    tk.wait_for(lambda: tk.status(control_port)["cluster"]["state"] == "DEGRADED", 120, interval=0.2,
                what="DEGRADED")
    degraded = time.monotonic() - t
    tk.wait_for(lambda: tk.status(control_port)["cluster"]["state"] == "SERVING", 600, interval=0.2,
                what="SERVING")
    return degraded, time.monotonic() - t


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--kills", type=int, default=3, help="engine kills in the first cluster")
    parser.add_argument("--out", default="bench/results/engines.json")
    args = parser.parse_args(argv)
    results: dict = {"config": vars(args), "first_completion_s": [], "engine_kill": []}
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        for i in range(args.starts):
            cp, rp = tk.free_port(), tk.free_port()
            t0 = time.monotonic()
            head = tk.start_controller(
                ["--role", "head", "--local-workers", "2", "--engine", "vllm", "--ray-port", str(rp),
                 "--control-port", str(cp), "--serve-port", str(tk.free_port()), "--log-format", "json",
                 "--state-dir", f"{tmp}/state"],
                Path(tmp) / f"head-{i}.log", control_port=cp)
            pids, pgids = {head.pid}, set()
            try:
                took = first_completion(cp, t0)
                results["first_completion_s"].append(round(took, 2))
                print(f"start {i + 1}: first completion answered {took:.1f}s after the start", flush=True)
                tk.wait_for(lambda: tk.status(cp)["cluster"]["state"] == "SERVING", 120, what="SERVING")
                for n in tk.status(cp)["nodes"]:
                    pids.add(n["pid"])
                    if n.get("ray_pgid"):
                        pgids.add(n["ray_pgid"])
                for k in range(args.kills if i == 0 else 0):
                    degraded, serving = kill_engine_and_time_recovery(cp)
                    results["engine_kill"].append({"degraded_s": round(degraded, 2), "serving_s": round(serving, 2)})
                    print(f"kill {k + 1}: engine SIGKILL -> DEGRADED {degraded:.1f}s, SERVING again {serving:.1f}s",
                          flush=True)
            finally:
                tk.stop_head(head, pids, pgids)
    fc = results["first_completion_s"]
    kills = [k["serving_s"] for k in results["engine_kill"]]
    results["summary"] = {"first_completion_s_median": statistics.median(fc) if fc else None,
                          "engine_kill_to_serving_s_median": statistics.median(kills) if kills else None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| figure | value |\n|---|---|")
    if fc:
        print(f"| head start -> first completion, median of {len(fc)} | {statistics.median(fc):.1f} s (runs: {fc}) |")
    if kills:
        print(f"| engine SIGKILL -> SERVING again, median of {len(kills)} | {statistics.median(kills):.1f} s "
              f"(runs: {kills}) |")
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
