"""Lifecycle figures on a real one-machine cluster (head + 2 local workers, `--engine none`):

- time from `python -m controller --role head` to SERVING on /status;
- time from SIGKILL of a worker node (all its processes) to DEGRADED on /status,
  with Ray's default health-check settings and with the controller's;
- CPU used by each node's controller process while idle in SERVING.

    python -m bench.lifecycle [--runs 3] [--idle-seconds 60] [--out bench/results/lifecycle.json]

Talks to loopback only; every cluster it starts is stopped by pid and group.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from controller import processes
from controller import testing as tk

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, with_children: bool = False) -> float:
    """CPU time of `pid`; with its reaped children too (its `ray health-check` runs)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    if with_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime + cstime
    return ticks / CLK_TCK


class Run:
    def __init__(self, tmp: Path, preset: str) -> None:
        self.tmp = tmp
        self.control_port = tk.free_port()
        self.ray_port = tk.free_port()
        self.pids: set[int] = set()
        self.pgids: set[int] = set()
        args = ["--role", "head", "--local-workers", "2", "--ray-port", str(self.ray_port),
                "--control-port", str(self.control_port), "--log-format", "json",
                "--state-dir", str(tmp / "state"), "--ray-health-check", preset, "--engine", "none"]
        self.t0 = time.monotonic()
        self.head = tk.start_controller(args, tmp / f"head-{preset}-{self.ray_port}.log", control_port=self.control_port)
        self.pids.add(self.head.pid)

    def record(self, status: dict) -> None:
        for n in status["nodes"]:
            if n.get("pid"):
                self.pids.add(n["pid"])
            if n.get("ray_pgid"):
                self.pgids.add(n["ray_pgid"])

    def wait_serving(self) -> tuple[float, dict]:
        s = tk.wait_for(lambda: (st := tk.status(self.control_port))["cluster"]["state"] == "SERVING" and st,
                        300, interval=0.1, what="SERVING")
        took = time.monotonic() - self.t0
        self.record(s)
        return took, s

    def kill_worker_and_time_detection(self, status: dict) -> float:
        victim = next(n for n in status["nodes"] if n["role"] == "worker")
        t = time.monotonic()
        tk.kill_node(victim)
        tk.wait_for(lambda: tk.status(self.control_port)["cluster"]["state"] == "DEGRADED",
                    180, interval=0.1, what="DEGRADED")
        return time.monotonic() - t

    def hang_worker_and_time_detection(self, status: dict) -> float:
        """SIGSTOP every process of a worker node (a hung machine), time DEGRADED, then kill it."""
        victim = next(n for n in status["nodes"] if n["role"] == "worker")
        pids = tk.node_pids(victim)
        t = time.monotonic()
        processes.signal_all(pids, signal.SIGSTOP)
        try:
            tk.wait_for(lambda: tk.status(self.control_port)["cluster"]["state"] == "DEGRADED",
                        180, interval=0.1, what="DEGRADED")
            return time.monotonic() - t
        finally:
            processes.kill_now(pids)

    def stop(self) -> None:
        left = tk.stop_head(self.head, self.pids, self.pgids, timeout=120)
        if left:
            print(f"warning: processes needed forcing after the run: {sorted(left)}", file=sys.stderr)


def idle_cpu(run: Run, status: dict, seconds: float) -> dict[str, dict[str, float]]:
    nodes = {n["node_id"]: n for n in status["nodes"]}

    def sample(n: dict) -> tuple[float, float, float]:
        ray_side = sum(cpu_seconds(p) for p in tk.node_pids(n) if p != n["pid"])
        return cpu_seconds(n["pid"]), cpu_seconds(n["pid"], with_children=True), ray_side

    before = {nid: sample(n) for nid, n in nodes.items()}
    time.sleep(seconds)
    after = {nid: sample(n) for nid, n in nodes.items()}
    state = tk.status(run.control_port)["cluster"]["state"]
    assert state == "SERVING", f"cluster left SERVING during the idle measurement: {state}"

    def pct(nid: str, i: int) -> float:
        return round(100 * (after[nid][i] - before[nid][i]) / seconds, 2)

    # The head's reaped children include its local worker controllers only once they
    # exit, which does not happen while idle, so the figure is the health checks'.
    return {nid: {"controller_cpu_pct": pct(nid, 0),
                  "controller_with_health_check_children_cpu_pct": pct(nid, 1),
                  "ray_processes_cpu_pct": pct(nid, 2)}
            for nid in nodes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--hang-runs", type=int, default=1, help="SIGSTOP runs per preset")
    parser.add_argument("--out", default="bench/results/lifecycle.json")
    args = parser.parse_args(argv)
    results: dict = {"config": vars(args), "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                     "serving_s": [], "detect_s": {"ray": [], "controller": []},
                     "hang_detect_s": {"ray": [], "controller": []}, "idle_cpu": None}
    with tempfile.TemporaryDirectory(prefix="bench-lifecycle-") as tmp:
        for i in range(args.runs):
            for preset in ("ray", "controller"):
                run = Run(Path(tmp), preset)
                try:
                    took, status = run.wait_serving()
                    results["serving_s"].append(round(took, 2))
                    if preset == "controller" and i == 0 and args.idle_seconds > 0:
                        results["idle_cpu"] = idle_cpu(run, status, args.idle_seconds)
                    detect = run.kill_worker_and_time_detection(status)
                    results["detect_s"][preset].append(round(detect, 2))
                    print(f"run {i + 1} preset={preset}: SERVING after {took:.1f}s, "
                          f"worker SIGKILL -> DEGRADED in {detect:.2f}s", flush=True)
                finally:
                    run.stop()
        for i in range(args.hang_runs):
            for preset in ("ray", "controller"):
                run = Run(Path(tmp), preset)
                try:
                    _, status = run.wait_serving()
                    hang = run.hang_worker_and_time_detection(status)
                    results["hang_detect_s"][preset].append(round(hang, 2))
                    print(f"hang run {i + 1} preset={preset}: worker SIGSTOP -> DEGRADED in {hang:.2f}s", flush=True)
                finally:
                    run.stop()
    summary = {
        "serving_s_median": statistics.median(results["serving_s"]),
        "detect_s_median": {k: statistics.median(v) for k, v in results["detect_s"].items() if v},
        "hang_detect_s_median": {k: statistics.median(v) for k, v in results["hang_detect_s"].items() if v},
    }
    results["summary"] = summary
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| figure | value |\n|---|---|")
    print(f"| head + 2 workers to SERVING, median of {len(results['serving_s'])} | {summary['serving_s_median']:.1f} s |")
    for preset, v in summary["detect_s_median"].items():
        print(f"| worker SIGKILL -> DEGRADED, `--ray-health-check {preset}`, median of {len(results['detect_s'][preset])} "
              f"| {v:.2f} s (runs: {results['detect_s'][preset]}) |")
    for preset, v in summary["hang_detect_s_median"].items():
        print(f"| worker SIGSTOP (hung) -> DEGRADED, `--ray-health-check {preset}`, median of "
              f"{len(results['hang_detect_s'][preset])} | {v:.2f} s |")
    for nid, cpu in (results["idle_cpu"] or {}).items():
        print(f"| idle CPU over {args.idle_seconds:g}s, {nid}: controller / with its `ray health-check` "
              f"runs / the node's Ray processes | {cpu['controller_cpu_pct']}% / "
              f"{cpu['controller_with_health_check_children_cpu_pct']}% / {cpu['ray_processes_cpu_pct']}% of a core |")
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
