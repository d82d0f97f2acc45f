"""Bad flags through the real entry point: one line on stderr, exit 2, nothing started."""

import subprocess
import sys

import pytest

CASES = [
    (["--role", "king"], "argument --role: invalid choice: 'king' (choose from 'head', 'worker')"),
    (["--role", "worker"], "a worker needs --head-address HOST:PORT"),
    (["--role", "worker", "--head-address", "10.0.0.1"], "head-address must be HOST:PORT, got '10.0.0.1'"),
    (["--role", "head", "--control-port", "70000"], "control-port must be a port from 1 to 65535, got 70000"),
    ([], "--role is required (head or worker)"),
]


@pytest.mark.parametrize("argv,message", CASES)
def test_bad_flags_exit_2_with_one_line(argv, message):
    r = subprocess.run([sys.executable, "-m", "controller", *argv], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr == f"controller: error: {message}\n"
    assert r.stdout == ""
