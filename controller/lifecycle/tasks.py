"""Named, tracked asyncio tasks: started once, their failure made visible."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable

from controller.logs import log

RECANCEL_S = 0.1


class TaskSet:
    def __init__(self, on_failure: Callable[[str, BaseException], None]) -> None:
        self._tasks: dict[str, asyncio.Task] = {}
        self._on_failure = on_failure

    def ensure(self, name: str, start: Callable[[], Awaitable[None]]) -> asyncio.Task:
        """Start `name` unless it already runs or ran; idempotent, never waits."""
        task = self._tasks.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(start(), name=name)
            task.add_done_callback(self._done)
            self._tasks[name] = task
        return task

    def running(self, name: str) -> bool:
        task = self._tasks.get(name)
        return task is not None and not task.done()

    def forget(self, name: str) -> None:
        """Let `name` be started again by the next `ensure`, cancelling it if it runs."""
        task = self._tasks.pop(name, None)
        if task is not None and not task.done():
            task.cancel()

    async def cancel(self, *names: str, timeout: float = 5.0) -> None:
        """Cancel and wait, at most `timeout`. A task is cancelled again while it runs:
        asyncio.wait_for (3.11) swallows a cancellation that arrives as its awaitable
        completes, and the task would then go on to its next wait."""
        pending = {self._tasks.pop(n) for n in names if n in self._tasks}
        for task in pending:
            task.cancel()  # whatever time is left: a task is never forgotten uncancelled
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while pending and (left := deadline - loop.time()) > 0:
            _, pending = await asyncio.wait(pending, timeout=min(left, RECANCEL_S))
            for task in pending:
                task.cancel()

    async def cancel_all(self, timeout: float = 5.0) -> None:
        """Cancel every task but the caller's own (shutdown runs inside one)."""
        me = asyncio.current_task()
        await self.cancel(*[n for n, t in self._tasks.items() if t is not me], timeout=timeout)

    def _done(self, task: asyncio.Task) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("task_failed", task=task.get_name(), error=f"{type(exc).__name__}: {exc}")
            self._on_failure(task.get_name(), exc)


async def every(interval: float | Callable[[], float], check: Callable[[], Awaitable[None]], name: str,
                error_interval: float = 2.0) -> None:
    """Run `check` forever, `interval` seconds apart; a failing check is logged, not
    fatal, and the next try waits at least `error_interval` (no hot loop on errors)."""
    while True:
        wait = interval() if callable(interval) else interval
        try:
            await check()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("monitor_error", monitor=name, error=f"{type(exc).__name__}: {exc}")
            wait = max(wait, error_interval)
        await asyncio.sleep(wait)
