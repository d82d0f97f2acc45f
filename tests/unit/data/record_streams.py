"""Record real vLLM streams for the splice's unit tests (tests/unit/test_splice.py).

Starts one vLLM CPU engine serving the tiny model, sends it the first leg of
each request variant (`Splice(route, body).next_request()`), then every
continuation a Splice asks for when that leg is cut after any of its events,
and every continuation of those continuations cut after any of their events.
Each answer's raw SSE bytes are kept, keyed by `key(route, body)`, in
vllm_streams.json.gz beside this file. The engine is stopped by its process
group.

Starts an engine: run it under the machine's lock,

    flock /tmp/cluster.lock .venv/bin/python -m tests.unit.data.record_streams
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run by path
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from controller.engines.engine import free_port  # noqa: E402
from controller.engines.tiny_model import MODEL_NAME, SERVED_NAME, WORDS, ensure_tiny_model  # noqa: E402
from controller.serving.splice import CHAT_ROUTE, COMPLETIONS_ROUTE, EventReader, Splice  # noqa: E402

DATA = Path(__file__).with_name("vllm_streams.json.gz")
HOST = "127.0.0.1"
READY_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 120
STOP_GRACE_S = 15
MAX_TOKENS = 24
PROMPT_A = "the cluster node head worker ray engine"
PROMPT_B = "drain join health epoch coordinator gateway latency stream answer"
CHAT_A = [{"role": "user", "content": PROMPT_A}]
CHAT_B = [{"role": "system", "content": "alpha beta gamma"}, {"role": "user", "content": PROMPT_B}]


def key(route: str, body: dict[str, Any]) -> str:
    """The recorded answer's key: the request, canonical."""
    return json.dumps([route, body], sort_keys=True, separators=(",", ":"))


def variants(stop_id: int, partial: str) -> list[dict[str, Any]]:
    """The client requests: (name, route, body). `stop_id`: a token the plain
    completion of PROMPT_A generates midway (a stop_token_ids variant);
    `partial`: a chat prompt whose answer has tokens that end inside a UTF-8
    character (no text)."""
    chat = {"model": SERVED_NAME, "temperature": 0, "max_tokens": MAX_TOKENS}
    comp = {"model": SERVED_NAME, "temperature": 0, "max_tokens": MAX_TOKENS}
    usage = {"stream_options": {"include_usage": True}}
    continuous = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    out = [
        ("chat", CHAT_ROUTE, {**chat, "messages": CHAT_A, "stream": True}),
        ("chat_usage", CHAT_ROUTE, {**chat, "messages": CHAT_A, "stream": True, **usage}),
        ("chat_logprobs_usage", CHAT_ROUTE, {**chat, "messages": CHAT_A, "stream": True, "logprobs": True, **usage}),
        ("chat_ids", CHAT_ROUTE, {**chat, "messages": CHAT_A, "stream": True, "return_token_ids": True, **usage}),
        ("chat_nostream", CHAT_ROUTE, {**chat, "messages": CHAT_A}),
        ("chat_nostream_logprobs_ids", CHAT_ROUTE, {**chat, "messages": CHAT_A, "logprobs": True,
                                                    "return_token_ids": True}),
        ("chat_b_max_completion_tokens", CHAT_ROUTE,
         {"model": SERVED_NAME, "temperature": 0, "max_completion_tokens": 28, "messages": CHAT_B, "stream": True,
          **usage}),
        ("chat_b_continuous_usage", CHAT_ROUTE,
         {**chat, "messages": CHAT_B, "stream": True, **continuous}),
        ("chat_stop_token", CHAT_ROUTE, {**chat, "messages": CHAT_A, "stream": True, "stop_token_ids": [stop_id],
                                         **usage}),
        ("chat_partial_chars_logprobs_usage", CHAT_ROUTE,
         {**chat, "messages": [{"role": "user", "content": partial}], "stream": True, "logprobs": True, **usage}),
        ("chat_partial_chars_ids", CHAT_ROUTE,
         {**chat, "messages": [{"role": "user", "content": partial}], "stream": True, "return_token_ids": True}),
        ("chat_partial_chars_nostream_logprobs", CHAT_ROUTE,
         {**chat, "messages": [{"role": "user", "content": partial}], "logprobs": True}),
        ("chat_partial_chars_continuous_usage", CHAT_ROUTE,
         {**chat, "messages": [{"role": "user", "content": partial}], "stream": True, **continuous}),
        ("completions", COMPLETIONS_ROUTE, {**comp, "prompt": PROMPT_A, "stream": True}),
        ("completions_usage", COMPLETIONS_ROUTE, {**comp, "prompt": PROMPT_A, "stream": True, **usage}),
        ("completions_logprobs2_usage", COMPLETIONS_ROUTE, {**comp, "prompt": PROMPT_A, "stream": True,
                                                            "logprobs": 2, **usage}),
        ("completions_ids", COMPLETIONS_ROUTE, {**comp, "prompt": PROMPT_A, "stream": True,
                                                "return_token_ids": True}),
        ("completions_nostream", COMPLETIONS_ROUTE, {**comp, "prompt": PROMPT_A}),
        ("completions_nostream_logprobs2_ids", COMPLETIONS_ROUTE, {**comp, "prompt": PROMPT_A, "logprobs": 2,
                                                                   "return_token_ids": True, "stream": False}),
        ("completions_continuous_usage_logprobs1", COMPLETIONS_ROUTE,
         {**comp, "prompt": PROMPT_A, "stream": True, "logprobs": 1, **continuous}),
        ("completions_b_min_tokens", COMPLETIONS_ROUTE, {**comp, "prompt": PROMPT_B, "stream": True,
                                                         "max_tokens": 28, "min_tokens": 10, **usage}),
        ("completions_stop_token", COMPLETIONS_ROUTE, {**comp, "prompt": PROMPT_A, "stream": True,
                                                       "stop_token_ids": [stop_id], "logprobs": 2, **usage}),
    ]
    return [{"name": n, "route": r, "body": b} for n, r, b in out]


# -- the engine -----------------------------------------------------------------------------

def start_engine(model: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--served-model-name", SERVED_NAME, "--host", HOST, "--port", str(port),
           "--disable-uvicorn-access-log"]
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)


def stop_engine(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    pgid = proc.pid  # start_new_session: the engine leads its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        pass
    try:  # the group's other members (the engine core) too
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=STOP_GRACE_S)


def wait_ready(proc: subprocess.Popen, port: int, log_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"engine exited {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"engine not ready in {READY_TIMEOUT_S} s:\n{log_path.read_text(errors='replace')[-3000:]}")


def post(port: int, route: str, body: dict[str, Any]) -> bytes:
    """The answer's raw bytes (the SSE stream, as the gateway reads it)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=REQUEST_TIMEOUT_S)
    try:
        conn.request("POST", route, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if resp.status != 200:
        raise SystemExit(f"{route} {json.dumps(body)} -> {resp.status}: {data[:500]!r}")
    return data


# -- what to record -------------------------------------------------------------------------

def events_of(raw: bytes) -> list[bytes]:
    reader = EventReader()
    events = reader.feed(raw)
    assert not reader.pending(), raw[-200:]
    return events


def cut_after(route: str, body: dict[str, Any], legs: list[list[bytes]]) -> tuple[str, dict[str, Any]] | None:
    """The request a Splice asks for when its last leg fails after the events
    given (earlier legs failed after theirs); None when the answer is finished."""
    sp = Splice(route, body)
    sp.next_request()
    for i, events in enumerate(legs):
        if i:
            sp.next_request()
        for e in events:
            sp.on_event(e)
    if sp.finished():
        return None
    return sp.next_request()


class Recorder:
    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: dict[str, str] = {}
        self.used: set[str] = set()
        self.requests = 0

    def get(self, route: str, body: dict[str, Any]) -> list[bytes]:
        k = key(route, body)
        self.used.add(k)
        if k not in self.streams:
            raw = post(self.port, route, body)
            self.streams[k] = raw.decode("utf-8")  # JSON text: UTF-8, strictly
            self.requests += 1
        return events_of(self.streams[k].encode("utf-8"))

    def variant(self, route: str, body: dict[str, Any]) -> None:
        first = self.get(*Splice(route, body).next_request())
        for k in range(len(first) + 1):
            nxt = cut_after(route, body, [first[:k]])
            if nxt is None:
                continue
            second = self.get(*nxt)
            for j in range(len(second) + 1):
                again = cut_after(route, body, [first[:k], second[:j]])
                if again is not None:
                    self.get(*again)


def stop_token(recorder: Recorder) -> int:
    """A token id the plain completion of PROMPT_A generates midway, first there."""
    body = {"model": SERVED_NAME, "temperature": 0, "max_tokens": MAX_TOKENS, "prompt": PROMPT_A}
    sp = Splice(COMPLETIONS_ROUTE, body)
    for e in recorder.get(*sp.next_request()):
        sp.on_event(e)
    ids = sp.generated
    for i in range(len(ids) // 2, len(ids) - 2):
        if ids[i] not in ids[:i]:
            return ids[i]
    raise SystemExit(f"no stop token candidate in {ids}")


def partial_chars_prompt(recorder: Recorder) -> str:
    """A chat prompt whose answer has a token with no text (the end of a UTF-8
    character yet to come) before its last token: the first of a fixed list."""
    for i in range(len(WORDS) - 4):
        prompt = " ".join(WORDS[i:i + 5])
        body = {"model": SERVED_NAME, "temperature": 0, "max_tokens": MAX_TOKENS, "stream": True,
                "messages": [{"role": "user", "content": prompt}]}
        sp = Splice(CHAT_ROUTE, body)
        for e in recorder.get(*sp.next_request())[:-3]:  # not the last token's, nor usage and [DONE]
            if e != b"[DONE]":
                choices = json.loads(e)["choices"]
                if choices and choices[0].get("token_ids") and not choices[0]["delta"].get("content"):
                    return prompt
    raise SystemExit("no chat prompt of the list has a token without text")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DATA)
    args = parser.parse_args(argv)
    model = ensure_tiny_model()
    port = free_port(HOST)
    with tempfile.TemporaryDirectory(prefix="record-streams-") as tmp:
        log_path = Path(tmp) / "engine.log"
        proc = start_engine(model, port, log_path)
        try:
            t0 = time.monotonic()
            wait_ready(proc, port, log_path)
            print(f"engine ready in {time.monotonic() - t0:.0f} s on port {port}", flush=True)
            import vllm
            recorder = Recorder(port)
            stop_id = stop_token(recorder)
            partial = partial_chars_prompt(recorder)
            recorder.used.clear()  # the probes' answers are kept only where a variant asks for them
            table = variants(stop_id, partial)
            for v in table:
                before = recorder.requests
                recorder.variant(v["route"], v["body"])
                print(f"{v['name']}: {recorder.requests - before} requests", flush=True)
            recorder.streams = {k: v for k, v in recorder.streams.items() if k in recorder.used}
        finally:
            stop_engine(proc)
    data = {"vllm": vllm.__version__, "model": MODEL_NAME, "max_tokens": MAX_TOKENS, "variants": table,
            "streams": dict(sorted(recorder.streams.items()))}
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    args.out.write_bytes(gzip.compress(blob, 9, mtime=0))
    print(f"{len(recorder.streams)} streams, {len(blob)} bytes, {args.out.stat().st_size} gzipped -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
