"""Pre-flight checks, each a one-line problem."""

import os

import pytest

from controller.config import load_config, local_gpu_count
from controller.preflight import gpu_fit_problem, model_problem, shm_problem

GB = 10**9


def test_model_paths(tmp_path):
    assert model_problem("tiny") is None
    assert model_problem("meta-llama/Llama-3.1-8B") is None  # a hub id: only vLLM can resolve it
    assert model_problem(str(tmp_path / "nope")) == f"model path {tmp_path / 'nope'} does not exist"
    f = tmp_path / "file"
    f.write_text("x")
    assert model_problem(str(f)) == f"model path {f} is not a directory"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "has no config.json: not a Hugging Face model directory" in model_problem(str(empty))
    (empty / "config.json").write_text("{}")
    assert model_problem(str(empty)) is None


def test_unreadable_model(tmp_path, monkeypatch):
    # The tests run as root, who reads everything: the permission answer is what is replaced.
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(m))
    assert model_problem(str(m)) == f"model path {m} is not readable by this user"


def test_shm_must_hold_every_local_nodes_store():
    assert shm_problem(1 * GB, 3, 4 * GB) is None
    assert shm_problem(2 * GB, 3, 4 * GB).startswith(
        "/dev/shm holds 4.00 GB but the object store needs 6.00 GB (2000000000 bytes for each of 3 node(s)")
    assert shm_problem(10 * 1024 * 1024, 1, 4 * GB) is not None  # under Ray's minimum


def test_gpu_fit():
    assert gpu_fit_problem(2, 2, 4) is None
    assert "= 8 GPUs; the cluster has 0" in gpu_fit_problem(4, 2, 0)


def test_gpu_count_follows_cuda_visible_devices():
    assert local_gpu_count({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == 3
    assert local_gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert local_gpu_count({"CUDA_VISIBLE_DEVICES": "-1"}) == 0


def test_engine_defaults_on_a_machine_without_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    c = load_config(["--role", "head"], {})
    assert (c.engine, c.mode, c.model, c.replicas) == ("vllm", "replicated", "tiny", 0)


def test_engine_defaults_on_a_machine_with_gpus(monkeypatch):
    from controller.config import ConfigError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    with pytest.raises(ConfigError, match="--model is required on a machine with GPUs"):
        load_config(["--role", "head"], {})
    c = load_config(["--role", "head", "--model", "/m", "--tensor-parallel-size", "2"], {})
    assert (c.mode, c.tensor_parallel_size) == ("sharded", 2)
