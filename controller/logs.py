"""Structured logging: JSON lines off a terminal, a console renderer on one."""

from __future__ import annotations

import errno
import logging
import os
import sys
from typing import Callable, TextIO

import structlog


def configure_logging(log_format: str = "auto", level: int = logging.INFO) -> None:
    """Configure structlog for the whole process; call once, before tasks start."""
    stream = OutputGuard(sys.stderr)
    if log_format == "auto":
        log_format = "console" if sys.stderr.isatty() else "json"
    renderer = (
        structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
        if log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Ray and others log through stdlib logging: same renderer, warnings and up.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
        ],
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
    ))
    handler.addFilter(_drop_expected_ray_warnings)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


class OutputGuard:
    """The stream the logs write to (stderr), made harmless when it breaks.

    A node may outlive where its output goes: the terminal it was started from is
    closed (writes fail with EIO; the node drains on the SIGHUP that came with it),
    or the reader of its pipe is gone (EPIPE). A log line must never raise into the
    code that logs, a drain least of all. At the first failed write or flush,
    `on_failure` (by default `discard_output`) points the process's stdout and
    stderr at /dev/null: later writes, Ray's and the interpreter's final flush
    among them, then succeed unseen and the exit code stays the node's own.
    """

    def __init__(self, stream: TextIO, on_failure: Callable[[], None] | None = None) -> None:
        self._stream = stream
        self._on_failure = on_failure or discard_output
        self.failed = False

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as exc:
            self._failed(exc)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as exc:
            self._failed(exc)

    def isatty(self) -> bool:
        return not self.failed and self._stream.isatty()

    def _failed(self, exc: OSError) -> None:
        """Only a reader that is gone for good silences the node; another error (a
        full disk, a busy pipe) costs that one line."""
        if exc.errno in GONE_FOR_GOOD and not self.failed:
            self.failed = True
            self._on_failure()


# The terminal closed (EIO, ENXIO) or the pipe's reader left (EPIPE).
GONE_FOR_GOOD = frozenset({errno.EIO, errno.EPIPE, errno.ENXIO})


def discard_output() -> None:
    """Point file descriptors 1 and 2 at /dev/null (where they went is gone)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        for fd in (1, 2):
            try:
                os.dup2(devnull, fd)
            except OSError:
                pass
    finally:
        os.close(devnull)


def _drop_expected_ray_warnings(record: logging.LogRecord) -> bool:
    # ray.init runs in a thread on purpose, so that Ray does not replace our
    # SIGTERM handler (its handler exits at once instead of draining).
    return "SIGTERM handler is not set" not in record.getMessage()


def bind_node(node_id: str, role: str) -> None:
    structlog.contextvars.bind_contextvars(node_id=node_id, role=role)


log = structlog.get_logger("controller")
