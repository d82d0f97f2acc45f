"""`--role auto` under Slurm: the role and the head's address from the job's environment.

Node 0 of the job (SLURM_NODEID=0) is the head; the others are workers that
join the first host of SLURM_JOB_NODELIST at the Ray port. The head expects
one worker per other node of the job. Slurm writes node lists compressed
(`gpu[01-03,07],cpu5`); `expand_nodelist` undoes that, as
`scontrol show hostnames` would, without needing scontrol.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from controller.config import ConfigError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ConfigError(f"SLURM_JOB_NODELIST is malformed: {text!r}")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    if depth != 0:
        raise ConfigError(f"SLURM_JOB_NODELIST is malformed: {text!r}")
    parts.append(current)
    return [p for p in (p.strip() for p in parts) if p]


def expand_nodelist(text: str) -> list[str]:
    """`gpu[01-03,07],cpu5` -> gpu01, gpu02, gpu03, gpu07, cpu5 (zero padding kept)."""
    hosts: list[str] = []
    for part in _split_top_level(text):
        m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]+)\]([^\[\]]*)", part)
        if m is None:
            if "[" in part or "]" in part:
                raise ConfigError(f"SLURM_JOB_NODELIST is malformed: {text!r}")
            hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            rm = _RANGE.match(r.strip())
            if rm is None:
                raise ConfigError(f"SLURM_JOB_NODELIST is malformed: {text!r}")
            lo, hi = rm.group(1), rm.group(2) or rm.group(1)
            if int(hi) < int(lo):
                raise ConfigError(f"SLURM_JOB_NODELIST is malformed: {text!r}")
            width = len(lo)
            hosts += [f"{prefix}{n:0{width}d}{suffix}" for n in range(int(lo), int(hi) + 1)]
    if not hosts:
        raise ConfigError("SLURM_JOB_NODELIST is empty")
    return hosts


@dataclass(frozen=True)
class SlurmRole:
    role: str
    head_address: str
    expected_workers: int


def derive(environ: dict[str, str], ray_port: int) -> SlurmRole:
    node_id, nodelist = environ.get("SLURM_NODEID"), environ.get("SLURM_JOB_NODELIST")
    if node_id is None or nodelist is None:
        raise ConfigError("--role auto needs a Slurm job: SLURM_NODEID and SLURM_JOB_NODELIST are not set "
                          "(run it under srun, or give --role head|worker)")
    if not node_id.isdigit():
        raise ConfigError(f"SLURM_NODEID is not a node number: {node_id!r}")
    hosts = expand_nodelist(nodelist)
    if int(node_id) >= len(hosts):
        raise ConfigError(f"SLURM_NODEID {node_id} is outside SLURM_JOB_NODELIST ({len(hosts)} nodes)")
    return SlurmRole(role="head" if int(node_id) == 0 else "worker",
                     head_address=f"{hosts[0]}:{ray_port}", expected_workers=len(hosts) - 1)
