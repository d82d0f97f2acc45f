"""`python -m controller status`: the cluster at a glance, from the head's /status.

    python -m controller status [--control-address HOST:PORT] [--json] [--watch [SECONDS]]

Prints the cluster (state, epoch, nodes alive/expected), its nodes, its
replicas and its last transitions as tables (rich); `--json` prints /status as
the head sent it; `--watch` redraws every few seconds until Ctrl-C.
Exit codes: 0 shown; 1 the head could not be reached; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from controller.config import ConfigError, operator_parser, parse_host_port

STATE_STYLES = {"SERVING": "bold green", "READY": "green", "DEGRADED": "bold yellow", "RESTARTING": "yellow",
                "STARTING": "cyan", "WAITING_FOR_WORKERS": "cyan", "JOINING": "cyan", "INIT": "cyan",
                "DRAINING": "magenta", "STOPPED": "dim", "LOST": "bold red", "FAILED": "bold red"}
TRANSITIONS_SHOWN = 10


class Unreachable(Exception):
    pass


def fetch(address: str, timeout: float = 5.0) -> bytes:
    url = f"http://{address}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        raise Unreachable(f"{url} answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"cannot reach the head's control port at {address}: {reason}") from None


def load(address: str) -> dict[str, Any]:
    data = fetch(address)
    try:
        status = json.loads(data)
        status["cluster"]
    except (ValueError, TypeError, KeyError):
        raise Unreachable(f"{address} answered /status with something that is not the head's status: "
                          f"{data[:80]!r}") from None
    return status


def _styled(state: str | None) -> Text:
    return Text(state or "-", style=STATE_STYLES.get(state or "", ""))


def _age(iso: str | None, now: datetime) -> str:
    if not iso:
        return "-"
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return iso
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s ago"
    if seconds < 7200:
        return f"{seconds // 60}m ago"
    return f"{seconds // 3600}h ago"


def render(status: dict[str, Any], address: str, now: datetime | None = None) -> Group:
    now = now or datetime.now(timezone.utc)
    c = status["cluster"]
    head = Text.assemble("cluster ", _styled(c.get("state")),
                         f"  epoch {c.get('epoch')}  mode {c.get('mode')}  engine {c.get('engine')}  "
                         f"nodes {c.get('alive_nodes')}/{c.get('expected_nodes')} alive  control {address}")
    if not c.get("coordinator_reachable", True):
        head.append("  coordinator unreachable", style="bold red")

    nodes = Table(title="nodes", title_justify="left", expand=False)
    for col in ("node", "role", "state", "address", "since", "pid"):
        nodes.add_column(col)
    for n in status.get("nodes", []):
        nodes.add_row(n.get("node_id", "-"), n.get("role") or "-", _styled(n.get("state")), n.get("address") or "-",
                      _age(n.get("since"), now), str(n.get("pid") or "-"))

    replicas = Table(title="replicas", title_justify="left", expand=False)
    for col in ("replica", "node", "state", "url", "in flight", "requests", "failed", "restarts"):
        replicas.add_column(col)
    for r in status.get("replicas", []):
        replicas.add_row(r.get("replica_id", "-"), r.get("node_id") or "-", _styled(r.get("state")),
                         r.get("url") or "-", str(r.get("in_flight", 0)), str(r.get("requests", 0)),
                         str(r.get("failed", 0)), str(r.get("restarts", 0)))

    moves = Table(title=f"last transitions (newest last, at most {TRANSITIONS_SHOWN})", title_justify="left",
                  expand=False)
    for col in ("when", "node", "from", "to", "trigger", "reason"):
        moves.add_column(col, overflow="fold")
    for t in status.get("transitions", [])[-TRANSITIONS_SHOWN:]:
        moves.add_row(_age(t.get("at"), now), t.get("node_id") or "-", _styled(t.get("from")), _styled(t.get("to")),
                      t.get("trigger") or "-", t.get("reason") or "")
    parts: list[Any] = [head, nodes]
    if status.get("replicas") or c.get("engine") != "none":
        parts.append(replicas)
    parts.append(moves)
    return Group(*parts)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = operator_parser("status", "Show the cluster from the head's /status.")
    parser.add_argument("--json", action="store_true", help="print /status as the head sent it")
    parser.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                        help="redraw every SECONDS (default 2) until Ctrl-C")
    args = parser.parse_args(argv)
    parse_host_port(args.control_address, "control-address")
    if args.watch is not None and not args.watch > 0:
        raise ConfigError(f"--watch must be greater than 0, got {args.watch:g}")
    return args


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as exc:
        print(f"controller status: error: {exc}", file=sys.stderr)
        return 2
    console = Console(width=None if sys.stdout.isatty() else 160)  # piped: wide enough for the tables
    try:
        if args.json:
            while True:
                print(fetch(args.control_address).decode(), flush=True)
                if args.watch is None:
                    return 0
                time.sleep(args.watch)
        if args.watch is None:
            console.print(render(load(args.control_address), args.control_address))
            return 0
        with Live(console=console, auto_refresh=False) as live:
            while True:
                try:
                    shown = render(load(args.control_address), args.control_address)
                except Unreachable as exc:
                    shown = Text(f"{exc} (retrying every {args.watch:g}s)", style="bold red")
                live.update(shown, refresh=True)
                time.sleep(args.watch)
    except Unreachable as exc:
        print(f"controller status: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
