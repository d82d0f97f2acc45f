"""Pre-flight checks: problems found before anything starts, each a clear error.

Local checks run in `python -m controller` before Ray or an engine starts (exit
2). Cluster checks need the joined nodes: the head checks that a sharded engine
fits the cluster's GPUs before launching it (`gpu_fit_problem`); the membership
rules (an address or versions that clash) are the coordinator's
(controller/cluster/coordinator.py, `member_problem`).
Each function returns None or the one-line problem.
"""

from __future__ import annotations

import os
from pathlib import Path

from controller.config import Config
from controller.cluster.ray_adapter import available_memory, object_store_bytes, shm_size

RAY_MIN_OBJECT_STORE = 78 * 1024 * 1024
GB = 10**9


class PreflightError(RuntimeError):
    """A pre-flight check failed; the message says which and what to do (one line)."""

    def __init__(self, message: str) -> None:
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


def model_problem(model: str | None) -> str | None:
    """A local model path must be a readable Hugging Face model directory.

    Anything that is not a path (no leading '/', '.', '~' and nothing at that
    path) is a hub id, which only vLLM can resolve.
    """
    if model in (None, "tiny"):
        return None
    path = Path(model).expanduser()
    if not (model.startswith(("/", ".", "~")) or path.exists()):
        return None
    if not path.exists():
        return f"model path {model} does not exist"
    if not path.is_dir():
        return f"model path {model} is not a directory"
    config = path / "config.json"
    if not os.access(path, os.R_OK | os.X_OK) or (config.exists() and not os.access(config, os.R_OK)):
        return f"model path {model} is not readable by this user"
    if not config.is_file():
        return f"model path {model} has no config.json: not a Hugging Face model directory"
    return None


def shm_problem(per_node: int, nodes_on_machine: int, shm: int) -> str | None:
    """Ray keeps its object store in /dev/shm; one that is too small makes Ray fall
    back to disk (slow) or fail when the store fills."""
    needed = per_node * nodes_on_machine
    if needed <= shm and per_node >= RAY_MIN_OBJECT_STORE:
        return None
    return (f"/dev/shm holds {shm / GB:.2f} GB but the object store needs {needed / GB:.2f} GB "
            f"({per_node} bytes for each of {nodes_on_machine} node(s) on this machine): "
            "enlarge /dev/shm (docker: --shm-size) or lower --object-store-memory")


def gpu_fit_problem(tensor_parallel: int, pipeline_parallel: int, cluster_gpus: float) -> str | None:
    needed = tensor_parallel * pipeline_parallel
    if needed <= cluster_gpus:
        return None
    return (f"sharded mode needs tensor-parallel-size x pipeline-parallel-size = "
            f"{tensor_parallel} x {pipeline_parallel} = {needed} GPUs; the cluster has {cluster_gpus:g}")


def local_checks(config: Config) -> None:
    """Everything checkable on this machine before starting anything."""
    problems = []
    if config.role == "head" and config.engine == "vllm":
        problems.append(model_problem(config.model))
    nodes_here = 1 + (config.local_workers if config.role == "head" else 0)
    per_node = config.object_store_memory or object_store_bytes(available_memory(), shm_size(), nodes_here)
    problems.append(shm_problem(per_node, nodes_here, shm_size()))
    for problem in problems:
        if problem:
            raise PreflightError(problem)
