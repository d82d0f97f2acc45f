"""A node whose terminal was closed (EIO) or whose pipe's reader is gone (EPIPE)
must log on without raising: a failed log line must not break a drain."""

from __future__ import annotations

import errno
import io
import logging

import structlog

from controller.logs import OutputGuard


class BrokenStream(io.StringIO):
    """A terminal that was closed: every write and flush fails as the kernel makes it."""

    def __init__(self, error: int) -> None:
        super().__init__()
        self.error = error

    def write(self, text: str) -> int:
        raise OSError(self.error, "gone")

    def flush(self) -> None:
        raise OSError(self.error, "gone")


def test_structlog_lines_to_a_closed_terminal_do_not_raise_and_silence_output_once():
    silenced = []
    guard = OutputGuard(BrokenStream(errno.EIO), on_failure=lambda: silenced.append(True))
    logger = structlog.PrintLogger(file=guard)
    logger.msg("drain_requested")  # print() writes then flushes: neither may raise
    logger.msg("transition")
    assert silenced == [True]
    assert guard.failed and not guard.isatty()


def test_stdlib_logging_to_a_pipe_without_reader_does_not_raise():
    silenced = []
    guard = OutputGuard(BrokenStream(errno.EPIPE), on_failure=lambda: silenced.append(True))
    logger = logging.getLogger("test_output_guard")
    handler = logging.StreamHandler(guard)
    logger.addHandler(handler)
    try:
        logger.warning("ray says something")
    finally:
        logger.removeHandler(handler)
    assert silenced == [True]


def test_a_working_stream_is_written_through():
    stream = io.StringIO()
    guard = OutputGuard(stream, on_failure=lambda: (_ for _ in ()).throw(AssertionError("not a failure")))
    structlog.PrintLogger(file=guard).msg("hello")
    assert stream.getvalue() == "hello\n" and not guard.failed
