"""A small client of the head's HTTP APIs (control port and gateway), for the
quickstart and for tests: read /status and /metrics, ask for a completion, wait
until a condition holds. Standard library only."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any, Callable


def get_json(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def complete(base_url: str, prompt: str, max_tokens: int, model: str = "tiny",
             timeout: float = 60.0) -> dict[str, Any]:
    """POST /v1/completions to an OpenAI-compatible server; the parsed answer."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    request = urllib.request.Request(base_url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def status(control_port: int, host: str = "127.0.0.1") -> dict[str, Any]:
    return get_json(f"http://{host}:{control_port}/status")[1]


def metrics(control_port: int, host: str = "127.0.0.1") -> dict[tuple[str, frozenset], float]:
    """/metrics parsed: {(sample name, frozenset of label items): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{host}:{control_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.5,
             what: str = "condition") -> Any:
    """Poll `predicate` until it returns a truthy value; raise TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (OSError, ValueError, KeyError) as exc:
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not reached within {timeout:g}s (last error: {last_error})")


def wait_cluster_state(control_port: int, state: str, timeout: float) -> dict[str, Any]:
    def check():
        s = status(control_port)
        return s if s["cluster"]["state"] == state else None
    return wait_for(check, timeout, what=f"cluster state {state}")
