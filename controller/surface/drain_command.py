"""`python -m controller drain`: ask the head to drain the cluster and wait for it.

    python -m controller drain [--control-address HOST:PORT] [--timeout SECONDS]

POSTs /drain on the head's control port (as SIGTERM to the head would: new
requests get 503, in-flight ones finish, workers are told to leave, every node
reaches STOPPED), then waits until the head's control port closes, i.e. the
head controller has exited. Meant for a Kubernetes preStop hook and for
operators. Exit codes: 0 drained (or no head was running); 1 still running
at the timeout; 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
import time
import urllib.error
import urllib.request

from controller.config import ConfigError, operator_parser, parse_host_port


def _post_drain(address: str) -> bool:
    """True when the head took the request; False when no head answers."""
    req = urllib.request.Request(f"http://{address}/drain", method="POST", data=b"")
    try:
        with urllib.request.urlopen(req, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # it answered: something is there, wait for it to stop
    except (urllib.error.URLError, OSError):
        return False


def _alive(address: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = operator_parser("drain", "Drain the cluster through the head's control port and wait for the head "
                                      "to stop.")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the head to stop")
    args = parser.parse_args(argv)
    parse_host_port(args.control_address, "control-address")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be greater than 0, got {args.timeout:g}")
    return args


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as exc:
        print(f"controller drain: error: {exc}", file=sys.stderr)
        return 2
    if not _post_drain(args.control_address):
        print(f"controller drain: no head answers at {args.control_address}: nothing to drain")
        return 0
    print(f"controller drain: the head at {args.control_address} is draining", flush=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if not _alive(args.control_address):
            print("controller drain: the head has stopped")
            return 0
        time.sleep(0.5)
    print(f"controller drain: error: the head still runs after {args.timeout:g}s", file=sys.stderr)
    return 1
