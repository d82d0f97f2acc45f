"""What every benchmark writes: a JSON result (config, environment, figures),
a Markdown summary next to it, and PNG plots.

The load benchmarks (sweep, failure, gateway) record every request; those
samples go to a gzip file of their own, `raw/NAME.json.gz` beside the JSON
(git ignores `bench/results/raw/`), and the JSON beside the Markdown keeps the
figures only (percentiles per run, no per-request sample): `write_results()`.
Each of them redraws its plots, Markdown and JSON from the raw file with
`--replot RAW.json.gz`.

The plots use matplotlib's file-only backend (no display needed); matplotlib
is in the `bench` extra that `scripts/setup.sh` installs.
"""

from __future__ import annotations

import gzip
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Iterable, Sequence


def environment() -> dict[str, Any]:
    """Where the figures came from."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        commit = None
    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": len(os.sched_getaffinity(0)), "commit": commit}


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write(out: str | Path, result: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """The JSON at `out`, the Markdown beside it (same name, .md)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    md = out.with_suffix(".md")
    md.write_text(markdown)
    return out, md


def raw_path(out: str | Path) -> Path:
    """Where the raw samples of the result at `out` go: raw/NAME.json.gz beside it."""
    out = Path(out)
    return out.parent / "raw" / f"{out.stem}.json.gz"


def without_samples(result: Any) -> Any:
    """The result without its per-request samples (every "samples" key, at any depth)."""
    if isinstance(result, dict):
        return {k: without_samples(v) for k, v in result.items() if k != "samples"}
    if isinstance(result, list):
        return [without_samples(v) for v in result]
    return result


def write_raw(path: str | Path, result: dict[str, Any]) -> Path:
    """The whole result, every sample included, as gzip'd JSON (no timestamp inside: the
    same result gives the same bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f, gzip.GzipFile(fileobj=f, mode="wb", mtime=0) as gz:
        gz.write(json.dumps(result).encode())
    return path


def read_raw(path: str | Path) -> dict[str, Any]:
    with gzip.open(path, "rt") as f:
        return json.load(f)


def write_results(out: str | Path, result: dict[str, Any], markdown: str,
                  raw: str | Path | None = None) -> tuple[Path, Path, Path]:
    """A load benchmark's files: the raw samples (the whole result, gzip'd) at `raw`
    (default raw_path(out); an existing raw file, when given, is left as it is), the
    JSON without samples at `out` (with `raw_samples`: where the raw file is, relative
    to it) and the Markdown beside it."""
    out = Path(out)
    if raw is None:
        raw = write_raw(raw_path(out), result)
    raw = Path(raw)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = {**without_samples(result), "raw_samples": os.path.relpath(raw, out.parent)}
    json_path, md = write(out, summary, markdown)
    return json_path, md, raw


def publish(out: str | Path, result: dict[str, Any], markdown: str, raw: str | Path | None = None,
            plot: str | Path | None = None) -> int:
    """A load benchmark's last step: its files (`write_results`), then the Markdown
    and where everything went, printed. Returns the exit code, 0."""
    json_path, md_path, raw_path = write_results(out, result, markdown, raw)
    print("\n" + markdown)
    print(f"results: {json_path}; summary: {md_path}; " + (f"plot: {plot}; " if plot else "")
          + f"raw samples: {raw_path}")
    return 0


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cdf(path: str | Path, series: dict[str, list[float]], title: str, xlabel: str) -> Path:
    """One empirical CDF per series (values in seconds, drawn in ms), log x."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, values in series.items():
        if not values:
            continue
        xs = sorted(v * 1000 for v in values)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of requests")
    ax.set_title(title)
    for q in (0.5, 0.95, 0.99):
        ax.axhline(q, color="grey", linewidth=0.5, linestyle=":")
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_timeline(path: str | Path, points: list[tuple[float, float, bool]], marks: list[tuple[float, str]],
                  title: str) -> Path:
    """Request latency over time: (send offset s, latency s, ok) as dots, failures
    as red crosses, and the run's events (kill, DEGRADED, ...) as vertical lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 5))
    ok = [(t, lat * 1000) for t, lat, good in points if good]
    bad = [(t, lat * 1000) for t, lat, good in points if not good]
    if ok:
        ax.scatter(*zip(*ok), s=6, label=f"ok (n={len(ok)})")
    if bad:
        ax.scatter(*zip(*bad), s=24, marker="x", color="red", label=f"failed (n={len(bad)})")
    colours = ["black", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink"]
    for i, (t, label) in enumerate(marks):
        ax.axvline(t, color=colours[i % len(colours)], linestyle="--", linewidth=1, label=f"{label} ({t:.1f} s)")
    ax.set_yscale("log")
    ax.set_xlabel("request planned send time (s from load start)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize="small", loc="upper left")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
