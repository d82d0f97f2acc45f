"""The state dir through the real entry point: --print-config writes nothing, a
relative state dir is refused, and the head's token file is dealt with at
start-up (each case ends before anything starts)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])  # run from elsewhere, the controller still comes from here


def run_controller(cwd, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "controller", *argv], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env)


def test_print_config_writes_nothing(tmp_path):
    r = run_controller(tmp_path, "--role", "head", "--engine", "none", "--state-dir", str(tmp_path / "state"),
                       "--print-config")
    assert r.returncode == 0, r.stderr
    assert f'state-dir = "{tmp_path / "state"}"  # command line' in r.stdout
    assert list(tmp_path.iterdir()) == []  # neither the state dir nor the token file


def test_a_relative_state_dir_exits_2_with_one_line(tmp_path):
    r = run_controller(tmp_path, "--role", "head", "--engine", "none", "--state-dir", "state")
    assert r.returncode == 2
    assert r.stderr == "controller: error: state-dir must be an absolute path, got 'state'\n"
    assert r.stdout == "" and list(tmp_path.iterdir()) == []


def test_the_heads_start_up_checks_its_token_file_before_anything_starts(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "ray-auth-token").write_text("")  # left by an earlier start, unusable
    r = run_controller(tmp_path, "--role", "head", "--engine", "none", "--state-dir", str(state))
    assert r.returncode == 2
    assert r.stderr == f"controller: error: ray-token-file is empty: {state / 'ray-auth-token'}\n"
    assert r.stdout == ""
