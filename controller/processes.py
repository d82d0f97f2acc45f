"""Process trees by process id and process group, read from /proc (Linux).

A node's processes are its controller, the process group `ray start` created
(Ray's daemons: `ray start` calls setpgrp, so they share its group) and every
descendant of those (Ray's worker processes start their own sessions under the
raylet). Everything here signals explicit pids; nothing matches by name.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    state: str


def _read_stat(pid: int) -> ProcInfo | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    rest = text[text.rindex(")") + 2 :].split()
    return ProcInfo(pid=pid, state=rest[0], ppid=int(rest[1]), pgid=int(rest[2]))


def process_table() -> dict[int, ProcInfo]:
    table: dict[int, ProcInfo] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _read_stat(int(entry))
            if info is not None:
                table[info.pid] = info
    return table


def is_running(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    info = _read_stat(pid)
    return info is not None and info.state not in ("Z", "X")


def tree(roots: set[int] = frozenset(), pgids: set[int] = frozenset(),
         exclude: set[int] = frozenset()) -> set[int]:
    """The given pids, the members of the given process groups, and all their
    descendants, but not the `exclude` pids nor anything below them."""
    table = process_table()
    found = {pid for pid in roots if pid in table}
    found |= {p.pid for p in table.values() if p.pgid in pgids}
    found -= set(exclude)
    children: dict[int, list[int]] = {}
    for p in table.values():
        children.setdefault(p.ppid, []).append(p.pid)
    stack = list(found)
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found and child not in exclude:
                found.add(child)
                stack.append(child)
    found.discard(os.getpid())
    return {pid for pid in found if is_running(pid)}


def cmdline(pid: int) -> str:
    """The process's command line ('' when it is gone): to tell which of our own
    recorded processes is which, never to find processes to signal."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def wait_gone(pids: set[int], timeout: float, poll: float = 0.1) -> set[int]:
    """Wait until every pid has exited; return those still running at the deadline."""
    deadline = time.monotonic() + timeout
    alive = {p for p in pids if is_running(p)}
    while alive and time.monotonic() < deadline:
        time.sleep(poll)
        alive = {p for p in alive if is_running(p)}
    return alive


def terminate(pids: set[int], grace: float) -> set[int]:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL the rest. Returns pids that survived."""
    signal_all(pids, signal.SIGTERM)
    left = wait_gone(pids, grace)
    if left:
        signal_all(left, signal.SIGKILL)
        left = wait_gone(left, 5.0)
    return left


def kill_now(pids: set[int]) -> set[int]:
    """Freeze then SIGKILL, as a machine failure would: no process gets to clean up."""
    signal_all(pids, signal.SIGSTOP)
    signal_all(pids, signal.SIGKILL)
    return wait_gone(pids, 5.0)
