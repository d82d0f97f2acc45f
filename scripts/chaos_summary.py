"""Sum up a chaos run's report (one JSON line per fault injected): per fault, how
many times, requests sent/failed/lost, and detection and recovery times."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def main(path: str) -> int:
    entries = [json.loads(line) for line in open(path) if line.strip()]
    if not entries:
        print(f"chaos summary: {path} is empty", file=sys.stderr)
        return 1
    by_fault: dict[str, list[dict]] = defaultdict(list)
    for e in entries:
        by_fault[e["fault"]].append(e)
    runs = sorted({e.get("run") for e in entries if e.get("run")})
    print(f"\nchaos: {len(entries)} faults injected over {len(runs) or 1} run(s)\n")
    print("| fault | injected | requests | failed | lost | detect s (median, max) | recover s (median, max) |")
    print("|---|---|---|---|---|---|---|")
    for fault, items in by_fault.items():
        def figure(key: str) -> str:
            values = [i[key] for i in items if i.get(key) is not None]
            return f"{statistics.median(values):.2f}, {max(values):.2f}" if values else "-"

        def total(key: str) -> str:
            values = [i[key] for i in items if i.get(key) is not None]
            return str(sum(values)) if values else "-"

        print(f"| {fault} | {len(items)} | {total('requests')} | {total('failed')} | {total('lost')} | "
              f"{figure('detect_s')} | {figure('recover_s')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
