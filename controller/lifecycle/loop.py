"""The reconcile loop: the single writer of a node's lifecycle machine.

Each tick: read the board (what monitors and effects observed), `decide` one
trigger, fire it, then run the idempotent `ensure` step for the current state.
Monitors and effects only write the board and wake the loop early.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Protocol

from controller.logs import log
from states import Decision, Lifecycle, Limits, Moved, Observation, Role, State, decide


class Board:
    """Mutable observations written by monitors and effects, read by the loop.

    Each observation has one writer (see docs/architecture.md); `health()` and the
    fault ledger are shared by design: they keep one entry per source. Times are
    readings of `clock`, the loop's own."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._values: dict[str, Any] = {}
        self._failures: dict[str, tuple[int, str | None]] = {}
        self._failing_since: dict[str, float] = {}
        self._faults: dict[str, float] = {}
        self.wake = asyncio.Event()

    def set(self, **values: Any) -> None:
        names = {f.name for f in fields(Observation)}
        unknown = set(values) - names
        if unknown:
            raise KeyError(f"not an observation: {sorted(unknown)}")
        changed = any(self._values.get(k, _MISSING) != v for k, v in values.items())
        self._values.update(values)
        if changed:
            self.wake.set()

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def health(self, source: str, error: str | None) -> None:
        """Record one health check of `source`: consecutive failures, reset on success.

        Sources are counted apart and the worst one is observed: one signal
        that is fine does not hide another that keeps failing.
        """
        if error is None:
            self._failures[source] = (0, None)
            self._failing_since.pop(source, None)
            self.clear_fault(source)
        else:
            count = self._failures.get(source, (0, None))[0] + 1
            self._failures[source] = (count, error)
            log.warning("health_check_failed", source=source, consecutive=count, error=error)
            self._failing_since.setdefault(source, self.clock())
            self.note_fault(source, self._failing_since[source])
        count, worst = max(self._failures.values(), key=lambda item: item[0])
        self.set(health_failures=count, last_health_error=worst)

    def note_fault(self, source: str, since: float) -> None:
        """A failure's first sign (a `clock` reading), kept while the source is failing:
        how long detection took is measured from the earliest one."""
        self._faults[source] = min(since, self._faults.get(source, since))

    def clear_fault(self, source: str) -> None:
        self._faults.pop(source, None)

    def first_fault(self) -> float | None:
        return min(self._faults.values(), default=None)

    def clear_faults(self) -> None:
        self._faults.clear()

    def failing_since(self, source: str) -> float | None:
        """When (`clock`) the current run of failures of `source` began."""
        return self._failing_since.get(source)

    def observe(self, now: float, entered_at: float) -> Observation:
        return replace(Observation(now=now, entered_at=entered_at), **self._values)


_MISSING = object()


class Effects(Protocol):
    """What a role does in the world. `ensure` must be idempotent and quick:
    it starts or checks tracked tasks, it never waits for long work."""

    async def ensure(self, state: State, obs: Observation) -> None: ...

    def on_moved(self, moved: Moved, record: dict[str, Any]) -> None: ...

    def epoch(self) -> int | None: ...

    async def shutdown(self, timeout: float) -> None:
        """Idempotent final cleanup: runs after STOPPED whatever the path there."""
        ...


@dataclass
class LoopResult:
    state: State
    fatal_reason: str | None


class NodeLoop:
    def __init__(
        self,
        role: Role,
        limits: Limits,
        board: Board,
        effects: Effects,
        clock: Callable[[], float],
        tick_interval: float = 1.0,
    ) -> None:
        self.role = role
        self.limits = limits
        self.board = board
        self.effects = effects
        self.clock = clock
        self.tick_interval = tick_interval
        self.machine = Lifecycle(role, on_moved=self._on_moved)
        self.entered_at = clock()
        self.fatal_reason: str | None = None
        self.last_moved: Moved | None = None

    @property
    def state(self) -> State:
        return self.machine.state

    def _on_moved(self, moved: Moved) -> None:
        now = self.clock()
        in_state_s = round(now - self.entered_at, 3)
        self.entered_at = now
        self.last_moved = moved
        if moved.trigger.value == "fatal":
            self.fatal_reason = moved.reason
        record = {
            "from": moved.source.value,
            "to": moved.dest.value,
            "trigger": moved.trigger.value,
            "reason": moved.reason,
            "in_state_s": in_state_s,
        }
        log.info("transition", epoch=self.effects.epoch(), **record)
        try:
            self.effects.on_moved(moved, record)
        except Exception as exc:  # reporting must never break the machine
            log.warning("transition_report_failed", error=repr(exc))

    async def tick(self) -> Decision | None:
        obs = self.board.observe(self.clock(), self.entered_at)
        decision = decide(self.role, self.state, obs, self.limits)
        if decision is not None:
            await self.machine.fire(decision.trigger, decision.reason)
            obs = self.board.observe(self.clock(), self.entered_at)
        if self.state is not State.STOPPED:
            try:
                await self.effects.ensure(self.state, obs)
            except Exception as exc:  # one tick never kills the loop
                log.exception("ensure_failed", state=self.state.value, error=repr(exc))
        return decision

    async def run(self) -> LoopResult:
        while self.state is not State.STOPPED:
            self.board.wake.clear()  # before observing: a wake during the tick is kept
            decision = await self.tick()
            if decision is not None:
                continue  # a transition happened: look again at once
            try:
                await asyncio.wait_for(self.board.wake.wait(), self.tick_interval)
            except asyncio.TimeoutError:
                pass
        return LoopResult(self.state, self.fatal_reason)
