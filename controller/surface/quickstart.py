"""The one-machine quickstart: a head and local worker nodes, one vLLM engine
replica per node serving the tiny model (made on the spot), an OpenAI-compatible
completion answered through the gateway, the status table and the metrics
printed, then a clean drain and stop (or `--stay` to keep it up).

    python -m controller.surface.quickstart [--stay] [--local-workers N] [--engine none] [head flags...]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
import urllib.request

from controller.surface import client as tk

SERVING_TIMEOUT_S = 600


def print_status(status: dict, control_port: int) -> None:
    """The status table (as `python -m controller status` shows it) and the metrics."""
    from rich.console import Console

    from controller.surface import status_command

    address = f"127.0.0.1:{control_port}"
    print(f"\n$ python -m controller status --control-address {address}")
    Console(width=None if sys.stdout.isatty() else 160).print(status_command.render(status, address))
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    shown = [line for line in metrics.splitlines()
             if line.startswith("llmctl_") and "_bucket{" not in line and "_created" not in line
             and not line.endswith(" 0.0")]
    print(f"\n$ curl -s http://{address}/metrics | grep ^llmctl_   (non-zero samples; no buckets, no _created)")
    print("\n".join(shown))
    sys.stdout.flush()


def answer_one_completion(serve_port: int, t0: float) -> None:
    """Ask the gateway for a completion through its OpenAI-compatible API, and show it."""
    url = f"http://127.0.0.1:{serve_port}"
    answer = tk.complete(url, "The cluster", max_tokens=8)
    print(f"quickstart: POST {url}/v1/completions -> {answer['choices'][0]['text']!r} "
          f"({answer['usage']['completion_tokens']} tokens; random weights, so the words are noise)", flush=True)
    print(f"quickstart: first completion answered {time.monotonic() - t0:.1f}s after the start", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m controller.surface.quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stay", action="store_true", help="keep the cluster up until Ctrl-C")
    parser.add_argument("--local-workers", type=int, default=2)
    parser.add_argument("--control-port", type=int, default=8080)
    parser.add_argument("--serve-port", type=int, default=8000)
    parser.add_argument("--engine", choices=("vllm", "none"), default="vllm")
    args, head_flags = parser.parse_known_args(argv)
    cmd = [sys.executable, "-m", "controller", "--role", "head", "--local-workers", str(args.local_workers),
           "--control-port", str(args.control_port), "--serve-port", str(args.serve_port), "--engine", args.engine,
           *head_flags]
    print("quickstart: " + " ".join(cmd[1:]), flush=True)
    t0 = time.monotonic()
    head = subprocess.Popen(cmd)
    try:
        def serving():
            if head.poll() is not None:
                raise SystemExit(head.returncode or 1)
            s = tk.status(args.control_port)
            return s if s["cluster"]["state"] == "SERVING" else None

        status = tk.wait_for(serving, SERVING_TIMEOUT_S, interval=1.0, what="cluster SERVING")
        print(f"\nquickstart: cluster SERVING after {time.monotonic() - t0:.1f}s", flush=True)
        if args.engine == "vllm":
            answer_one_completion(args.serve_port, t0)
            status = tk.status(args.control_port)  # now with the request counted
        print_status(status, args.control_port)
        if args.stay:
            print("\nquickstart: staying up; Ctrl-C drains and stops the cluster", flush=True)
            return head.wait()
        print("\nquickstart: draining and stopping", flush=True)
        head.send_signal(signal.SIGTERM)
        code = head.wait(timeout=300)
        print(f"quickstart: controller exited with {code}", flush=True)
        return code
    except KeyboardInterrupt:
        head.send_signal(signal.SIGTERM)
        return head.wait(timeout=300)
    except TimeoutError as exc:
        print(f"quickstart: error: {exc}", file=sys.stderr)
        head.send_signal(signal.SIGTERM)
        head.wait(timeout=300)
        return 1
    finally:
        if head.poll() is None:
            head.kill()


if __name__ == "__main__":
    sys.exit(main())
