"""Bad flags through the real entry point: one line on stderr, exit 2, nothing started."""

import os
import subprocess
import sys

import pytest

CASES = [
    (["--role", "king"], "argument --role: invalid choice: 'king' (choose from 'head', 'worker', 'auto')"),
    (["--role", "worker"], "a worker needs --head-address HOST:PORT"),
    (["--role", "worker", "--head-address", "10.0.0.1"], "head-address must be HOST:PORT, got '10.0.0.1'"),
    (["--role", "head", "--control-port", "70000"], "control-port must be a port from 1 to 65535, got 70000"),
    ([], "--role is required (head, worker, or auto under Slurm)"),
]


@pytest.mark.parametrize("argv,message", CASES)
def test_bad_flags_exit_2_with_one_line(argv, message):
    r = subprocess.run([sys.executable, "-m", "controller", *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr == f"controller: error: {message}\n"
    assert r.stdout == ""


def run_controller(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "controller", *argv], capture_output=True, text=True, timeout=60)


def test_missing_model_path_fails_pre_flight(tmp_path):
    r = run_controller("--role", "head", "--model", str(tmp_path / "no-such-model"), "--ray-port", "1")
    assert r.returncode == 2
    assert r.stderr == f"controller: error: pre-flight: model path {tmp_path / 'no-such-model'} does not exist\n"
    assert r.stdout == ""  # nothing started, nothing logged


@pytest.mark.chaos
def test_object_store_larger_than_dev_shm_fails_pre_flight(chaos_report):
    import os

    st = os.statvfs("/dev/shm")
    too_big = st.f_blocks * st.f_frsize // 2 + 1  # two nodes on this machine: twice that does not fit
    r = run_controller("--role", "head", "--local-workers", "1", "--object-store-memory", str(too_big))
    assert r.returncode == 2
    assert r.stderr.startswith("controller: error: pre-flight: /dev/shm holds ")
    assert r.stderr.endswith("enlarge /dev/shm (docker: --shm-size) or lower --object-store-memory\n")
    assert r.stderr.count("\n") == 1 and r.stdout == ""
    chaos_report(fault="/dev/shm smaller than the object store: pre-flight", detect_s=None)


def test_print_config_prints_toml_and_starts_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "controller", "--role", "head", "--model", str(tmp_path / "absent"),
                        "--print-config"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LLMCTL_API_KEY": "never-printed-key"})
    # The missing model would fail pre-flight: printing the config checks nothing beyond the settings.
    assert r.returncode == 0, r.stderr
    assert 'role = "head"  # command line' in r.stdout and 'api-key = "***"' in r.stdout
    assert "never-printed-key" not in r.stdout + r.stderr
