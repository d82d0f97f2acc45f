"""The command line: `python -m controller --role head|worker [flags]`, and the
operator's commands `python -m controller status` (controller/status_command.py)
and `python -m controller drain` (controller/drain_command.py).

Exit codes: 0 after a clean drain and stop; 1 after a fatal error (the reason
is the last log line and the last line on stderr); 2 for bad configuration or a
failed pre-flight check (nothing was started).
"""

from __future__ import annotations

import asyncio
import signal
import sys

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


async def run_node(config: Config, stop: asyncio.Event | None = None) -> int:
    """Run one node until STOPPED. `stop`, when set, drains it as SIGTERM would."""
    loop = asyncio.get_running_loop()
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

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_drain, f"{signal.Signals(sig).name} received")
    stop_watch = None
    if stop is not None:
        async def _watch_stop() -> None:
            await stop.wait()
            request_drain("stop requested")
        stop_watch = loop.create_task(_watch_stop())

    server = None
    if isinstance(node, HeadNode):
        server = ControlServer(config.control_host, config.control_port,
                               state=lambda: node_loop.state, ready=node.ready, status=node.status,
                               request_drain=request_drain, metrics=node.metrics_text)
        try:
            await server.start()
            if gateway is not None:
                await gateway.start()
        except OSError as exc:
            await server.stop()
            log.error("fatal", reason=str(exc))
            return fail(str(exc), EXIT_FATAL)

    log.info("controller_starting", config=config.printable())
    try:
        result = await node_loop.run()
    finally:
        try:
            await asyncio.wait_for(node.shutdown(config.drain_timeout),
                                   config.drain_timeout + CLEANUP_MARGIN_S)
        except Exception as exc:
            log.error("cleanup_failed", error=f"{type(exc).__name__}: {exc}")
        if gateway is not None:
            await gateway.stop()
        if server is not None:
            await server.stop()
        if stop_watch is not None:
            stop_watch.cancel()
    if result.fatal_reason:
        log.error("fatal", reason=result.fatal_reason)
        return fail(result.fatal_reason, EXIT_FATAL)
    log.info("stopped", state=result.state.value)
    return EXIT_OK


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
