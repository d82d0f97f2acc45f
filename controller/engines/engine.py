"""One supervised vLLM OpenAI server process: start, readiness, probe, stop.

Readiness is `/health` answering 200 and then a real 1-token completion: an
engine that answers `/health` but cannot generate is not ready. The engine's
output is kept, numbered, for the head to pull into its structured log with the
replica id (or logged at once with `echo`), and the last error line is kept so
that a failure can say why (exit code, last error).
The process runs in its own session and is stopped by process group.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections import deque
from dataclasses import dataclass, field

import aiohttp

from controller import processes
from controller.logs import log
from controller.cluster.ray_adapter import child_env, port_free

# vLLM keeps its /metrics token counters only with stats logging on (they tell a
# busy engine from a stalled one); its periodic throughput line is then logged
# once a minute rather than every 10 s.
STATS_ENV = {"VLLM_LOG_STATS_INTERVAL": "60"}
# vLLM's CPU build reserves this many GiB of KV cache per engine (its default is
# far larger than a tiny model on a shared 2-core machine needs).
DEFAULT_ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", **STATS_ENV}
WARM_UP_REQUESTS = 4


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on `host`, outside Ray's default worker port range (10002-19999)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


class EngineFailed(RuntimeError):
    """The engine could not start, or stopped; the message says why."""


@dataclass(frozen=True)
class EngineSpec:
    model: str
    served_name: str
    host: str
    port: int
    max_model_len: int | None = None
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_ENGINE_ENV))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def vllm_command(spec: EngineSpec) -> list[str]:
    # `python -m`: the `vllm` console script fails under vllm-cpu (it looks up the
    # distribution name `vllm`).
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", spec.model,
        "--served-model-name", spec.served_name,
        "--host", spec.host,
        "--port", str(spec.port),
        *(["--max-model-len", str(spec.max_model_len)] if spec.max_model_len else []),
        "--disable-uvicorn-access-log",  # stats logging stays on: see STATS_ENV
        *spec.extra_args,
    ]


def _is_error_line(line: str) -> bool:
    return any(word in line for word in ("Error", "error:", "ERROR", "Exception"))


class EngineProcess:
    def __init__(self, spec: EngineSpec, replica_id: str, output_lines: int = 500, echo: bool = True,
                 first_seq: int = 0) -> None:
        self.spec = spec
        self.replica_id = replica_id
        self.echo = echo
        self.proc: asyncio.subprocess.Process | None = None
        self.last_error: str | None = None
        # (sequence number, line): a reader asks for the lines after the last it saw.
        self.recent: deque[tuple[int, str]] = deque(maxlen=output_lines)
        self.seq = first_seq
        self._reader: asyncio.Task | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def url(self) -> str:
        return self.spec.url

    async def start(self) -> None:
        if not port_free(self.spec.host, self.spec.port):
            raise EngineFailed(f"engine port {self.spec.host}:{self.spec.port} is already taken")
        env = child_env(self.spec.env)
        self.proc = await asyncio.create_subprocess_exec(
            *vllm_command(self.spec),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, env=env, start_new_session=True,
        )
        self._reader = asyncio.get_running_loop().create_task(self._forward_output())
        log.info("engine_started", replica_id=self.replica_id, pid=self.proc.pid, url=self.url,
                 model=self.spec.model)

    async def _forward_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if not line:
                continue
            self.seq += 1
            self.recent.append((self.seq, line))
            if _is_error_line(line):
                self.last_error = line.strip()
            if self.echo:
                log.info("engine_output", replica_id=self.replica_id, line=line)

    def output_since(self, seq: int) -> list[tuple[int, str]]:
        """The kept lines numbered after `seq` (older ones may have been dropped)."""
        return [(n, line) for n, line in self.recent if n > seq]

    def exit_reason(self) -> str | None:
        """None while the engine runs; else its exit code and last error line."""
        if self.proc is None or self.proc.returncode is None:
            return None
        return f"engine exited with code {self.proc.returncode}" + (
            f": {self.last_error}" if self.last_error else "")

    async def wait_ready(self, timeout: float, poll: float = 1.0) -> None:
        """Return once `/health` is 200 and a 1-token completion succeeds; raise EngineFailed otherwise."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = "no answer yet"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            while loop.time() < deadline:
                if self.proc is not None and self.proc.returncode is not None:
                    await self._drain_reader()
                    raise EngineFailed(self.exit_reason() or "engine exited")
                try:
                    async with http.get(self.url + "/health") as resp:
                        healthy = resp.status == 200
                        last = f"/health answered {resp.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    healthy, last = False, f"/health: {type(exc).__name__}"
                if healthy:
                    error = await self.probe(http=http) or await self.warm_up(http)
                    if error is None:
                        log.info("engine_ready", replica_id=self.replica_id, url=self.url)
                        return
                    last = error
                await asyncio.sleep(poll)
        raise EngineFailed(f"engine not ready within {timeout:g}s ({last})")

    async def warm_up(self, http: aiohttp.ClientSession, requests: int = WARM_UP_REQUESTS) -> str | None:
        """A few requests at once, so that the first batches of real traffic do not pay
        for the engine's first multi-sequence steps (seconds on a cold CPU engine,
        which compiles its graphs for batch sizes above one on first use)."""
        errors = await asyncio.gather(*(self.probe(timeout=120, http=http, tokens=4) for _ in range(requests)))
        return next((f"warm-up: {e}" for e in errors if e), None)

    async def probe(self, timeout: float = 10.0, http: aiohttp.ClientSession | None = None,
                    tokens: int = 1) -> str | None:
        """One real token (or `tokens`): None when the engine generates, else why it did not."""
        body = {"model": self.spec.served_name, "prompt": "ping", "max_tokens": tokens, "temperature": 0,
                "ignore_eos": True}
        own = http is None
        session = http or aiohttp.ClientSession()
        try:
            async with session.post(self.url + "/v1/completions", json=body,
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                if resp.status != 200:
                    return f"generation probe answered {resp.status}: {(await resp.text())[:200]}"
                data = await resp.json()
                if not data.get("choices") or data.get("usage", {}).get("completion_tokens") != tokens:
                    return f"generation probe returned no token: {str(data)[:200]}"
                return None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return f"generation probe failed: {type(exc).__name__}: {exc}"
        finally:
            if own:
                await session.close()

    async def stop(self, grace: float = 10.0) -> set[int]:
        """Stop the engine and everything it started; returns pids that survived."""
        if self.proc is None:
            return set()
        left = await asyncio.to_thread(
            lambda: processes.terminate(processes.tree({self.proc.pid}, {self.proc.pid}), grace))
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except asyncio.TimeoutError:
            pass
        await self._drain_reader()
        log.info("engine_stopped", replica_id=self.replica_id, reason=self.exit_reason())
        return left

    async def _drain_reader(self) -> None:
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._reader.cancel()
