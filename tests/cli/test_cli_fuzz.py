"""Hostile command lines through the real entry point, property-based: every
invalid one ends with exit 2 and one clear line on stderr, no traceback, and
nothing started (it returns before any Ray or engine work; the whole run is
far shorter than a `ray start`)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings

from controller.config import ConfigError, load_config

from tests.unit.test_config_fuzz import argv, environ

ROOT = str(Path(__file__).resolve().parents[2])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.filter_too_much])
@given(args=argv(), env=environ())
def test_invalid_command_lines_exit_2_with_one_line(tmp_path_factory, args, env):
    env = {**env, "LLMCTL_STATE_DIR": str(tmp_path_factory.mktemp("state"))}
    # Both runs from an empty folder: a relative path in the input must not reach the checkout,
    # and means the same to both.
    cwd = tmp_path_factory.mktemp("cwd")
    here = os.getcwd()
    os.chdir(cwd)
    try:
        load_config(args, env)
    except ConfigError as exc:
        expected = str(exc)
    else:
        assume(False)  # a valid one would start a cluster: not this test's business
    finally:
        os.chdir(here)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("LLMCTL_", "SLURM_"))}
    if any("\x00" in a for a in args) or any("\x00" in v for v in env.values()):
        assume(False)  # the OS refuses NUL in argv and environment before we run
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, clean.get("PYTHONPATH")]))  # the code beside us
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "controller", *args], env={**clean, **env}, capture_output=True,
                       text=True, timeout=60, cwd=cwd)
    assert r.returncode == 2, (args, env, r.stderr)
    assert r.stderr == f"controller: error: {expected}\n", r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert time.monotonic() - t0 < 10
    assert list(cwd.iterdir()) == []  # nothing written on the way to the error
