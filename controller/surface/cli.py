"""The command line: `python -m controller --role head|worker [flags]`, and the
operator's commands `python -m controller status` (controller/status_command.py)
and `python -m controller drain` (controller/drain_command.py).

Exit codes: 0 after a clean drain and stop; 1 after a fatal error (the reason
is the last log line and the last line on stderr); 2 for bad configuration or a
failed pre-flight check (nothing was started).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import AsyncIterator, Callable, Iterator, NoReturn, Protocol

import uvloop

from controller.cluster import ray_token
from controller.config import Config, ConfigError, load_config_with_sources, render_config
from controller.surface.control_server import ControlServer
from controller.lifecycle.head import HeadNode
from controller.logs import bind_node, configure_logging, log
from controller.lifecycle.loop import Board, NodeLoop
from controller.preflight import PreflightError, local_checks
from controller.cluster.ray_adapter import RayAdapter, prepare_driver_env
from controller.lifecycle.worker import WorkerNode
from states import Limits, Role

EXIT_OK, EXIT_FATAL, EXIT_CONFIG = 0, 1, 2
# The final cleanup gets the drain's time plus this much for stopping Ray.
CLEANUP_MARGIN_S = 45.0


def fail(reason: str, code: int) -> int:
    print(f"controller: error: {reason}", file=sys.stderr, flush=True)
    return code


def limits_for(config: Config) -> Limits:
    return Limits(
        expected_nodes=config.expected_nodes,
        wait_timeout=config.wait_timeout,
        degraded_timeout=config.degraded_timeout,
        failure_threshold=config.failure_threshold,
    )


# Each of these starts the drain. SIGHUP too: a node started by hand from a terminal
# gets it when that terminal closes (`tmux kill-session`, a closed window, a dropped
# ssh session), and must not die on it with its Ray, engines and workers running.
DRAIN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def drain_on_signals(loop: asyncio.AbstractEventLoop, request_drain: Callable[[str], None]) -> Iterator[None]:
    """DRAIN_SIGNALS drain the node while in effect. A signal ignored when the node
    started stays ignored (`nohup`: the operator asked it to outlive the terminal).
    Afterwards they are ignored: the node is stopping, and a second Ctrl-C or SIGTERM
    in its last moment must not turn a clean stop into a death by signal."""
    installed = []
    try:
        for sig in DRAIN_SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:
                log.info("signal_stays_ignored", signal=sig.name)
                continue
            loop.add_signal_handler(sig, request_drain, f"{sig.name} received")
            installed.append(sig)
        yield
    finally:
        for sig in reversed(installed):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)


@contextlib.asynccontextmanager
async def drain_when_set(stop: asyncio.Event, request_drain: Callable[[str], None]) -> AsyncIterator[None]:
    """`stop` (tests, embedding) drains the node as a signal would."""
    async def watch() -> None:
        await stop.wait()
        request_drain("stop requested")

    task = asyncio.get_running_loop().create_task(watch(), name="stop_watch")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class Server(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@contextlib.asynccontextmanager
async def serving(server: Server) -> AsyncIterator[None]:
    """A listening server, stopped on the way out (also after a start that failed half-way)."""
    try:
        await server.start()
        yield
    finally:
        await server.stop()


@contextlib.asynccontextmanager
async def node_stopped_at_exit(node: HeadNode | WorkerNode, config: Config) -> AsyncIterator[None]:
    """The node's final cleanup, whatever ended its loop: idempotent (a drain has
    usually done it already) and bounded, and never the reason the rest is skipped."""
    try:
        yield
    finally:
        try:
            await asyncio.wait_for(node.shutdown(config.drain_timeout), config.drain_timeout + CLEANUP_MARGIN_S)
        except Exception as exc:
            log.error("cleanup_failed", error=f"{type(exc).__name__}: {exc}")


# Once the node has stopped, calls still running in threads get this long to end; then
# the process exits without them. A thread cannot be cancelled, and a Ray call into a
# head whose Ray hangs never returns: the driver waits for its GCS for as long as
# RAY_gcs_rpc_server_reconnect_timeout_s (days; ray_adapter). The interpreter waits
# for every thread at exit, so one such call kept a drained worker alive for minutes.
STUCK_CALLS_WAIT_S = 1.0


class CallPool(ThreadPoolExecutor):
    """The loop's default executor (asyncio.to_thread): it knows which calls still run."""

    def __init__(self) -> None:
        super().__init__(thread_name_prefix="call")
        self.running: dict[Future, str] = {}
        self._lock = threading.Lock()

    def submit(self, fn, /, *args, **kwargs) -> Future:  # type: ignore[override]
        future = super().submit(fn, *args, **kwargs)
        with self._lock:
            self.running[future] = _call_name(fn)
        future.add_done_callback(self._ended)
        return future

    def _ended(self, future: Future) -> None:
        with self._lock:
            self.running.pop(future, None)

    async def stuck_calls(self, timeout: float) -> list[str]:
        """The calls still running after waiting up to `timeout` for them."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while self.running and loop.time() < end:
            await asyncio.sleep(0.05)
        with self._lock:
            return sorted(self.running.values())


def _call_name(fn: Callable) -> str:
    if isinstance(fn, functools.partial) and fn.args:  # asyncio.to_thread: partial(context.run, f, ...)
        fn = fn.args[0]
    return f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}".lstrip(".")


def exit_now(code: int) -> NoReturn:
    """End the process with `code` without waiting for its threads (nor atexit hooks)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


async def run_node(config: Config, stop: asyncio.Event | None = None) -> int:
    """Run one node until STOPPED. `stop`, when set, drains it as SIGTERM would.

    What it starts (signal handlers, the stop watch, the control server, the
    gateway, the node) goes on an exit stack as it starts: it is torn down in the
    reverse order, whatever fails and wherever, and only what did start. A call
    stuck in a thread past that (STUCK_CALLS_WAIT_S) does not keep the process:
    it exits at once, with the code it would have returned.
    """
    loop = asyncio.get_running_loop()
    calls = CallPool()
    loop.set_default_executor(calls)
    role = Role(config.role)
    board = Board(clock=loop.time)  # one clock, the loop's, for every timestamp the node compares
    ray = RayAdapter(config.node_ip_address)
    node = HeadNode(config, board, ray) if role is Role.HEAD else WorkerNode(config, board, ray)
    node_loop = NodeLoop(role, limits_for(config), board, node, clock=loop.time,
                         tick_interval=config.tick_interval)

    gateway = node.gateway if isinstance(node, HeadNode) else None

    def request_drain(reason: str) -> None:
        if not board.get("drain_requested"):
            log.info("drain_requested", reason=reason)
            board.set(drain_requested=reason)
            if gateway is not None:
                gateway.start_draining()  # new requests get 503 from now, not from the next tick

    fatal: str | None = None
    async with contextlib.AsyncExitStack() as stack:
        stack.enter_context(drain_on_signals(loop, request_drain))
        if stop is not None:
            await stack.enter_async_context(drain_when_set(stop, request_drain))
        try:
            if isinstance(node, HeadNode):
                await stack.enter_async_context(serving(
                    ControlServer(config.control_host, config.control_port,
                                  state=lambda: node_loop.state, ready=node.ready, status=node.status,
                                  request_drain=request_drain, metrics=node.metrics_text)))
                if gateway is not None:
                    await stack.enter_async_context(serving(gateway))
        except OSError as exc:  # a port taken: nothing of the node started yet
            fatal = str(exc)
        else:
            await stack.enter_async_context(node_stopped_at_exit(node, config))
            log.info("controller_starting", config=config.printable())
            try:
                fatal = (await node_loop.run()).fatal_reason
            except Exception as exc:  # a bug: still torn down, reported, and no wait on stuck calls
                log.exception("loop_failed")
                fatal = f"the node's loop failed: {type(exc).__name__}: {exc}"
    stuck = await calls.stuck_calls(STUCK_CALLS_WAIT_S)
    if stuck:
        log.warning("exit_without_waiting_for_calls", calls=stuck, waited_s=STUCK_CALLS_WAIT_S)
    # Reported after the teardown, so that the reason is the last log line and on stderr.
    if fatal:
        log.error("fatal", reason=fatal)
        code = fail(fatal, EXIT_FATAL)
    else:
        log.info("stopped", state=node_loop.state.value)
        code = EXIT_OK
    if stuck:
        exit_now(code)
    return code


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:
        from controller.surface import status_command  # rich is only needed here

        return status_command.main(argv[1:])
    if argv[:1] == ["drain"]:
        from controller.surface import drain_command

        return drain_command.main(argv[1:])
    try:
        config, sources = load_config_with_sources(argv)
        if "--print-config" in argv:
            print(render_config(config, sources), end="")
            return EXIT_OK
        local_checks(config)
        auth = ray_token.resolve(config)  # decides only: loading and --print-config write nothing
        ray_token.ensure_head_token(auth)  # the node starts now: the head makes its token file if missing
    except ConfigError as exc:
        return fail(str(exc), EXIT_CONFIG)
    except PreflightError as exc:
        return fail(f"pre-flight: {exc}", EXIT_CONFIG)
    prepare_driver_env()
    ray_token.apply(auth)
    configure_logging(config.log_format)
    bind_node(config.node_id, config.role)
    log.info("ray_auth", mode=auth.mode, token_from=auth.source)
    # uvloop: the gateway relays every request and every streamed chunk through
    # this loop; uvloop roughly halves the time each takes.
    return uvloop.run(run_node(config))
