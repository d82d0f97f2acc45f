"""The lifecycle state machine, built with `transitions`' asyncio machine.

The machine only moves between states and reports what moved; it does no work.
Long work (starting Ray, joining) runs as tasks owned by the controller loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from transitions import MachineError
from transitions.extensions.asyncio import AsyncMachine

from states.lifecycle import Role, State, Trigger, table_for


@dataclass(frozen=True)
class Moved:
    """One transition that happened."""

    source: State
    dest: State
    trigger: Trigger
    reason: str


class Lifecycle:
    """The model the machine drives: one node's lifecycle state."""

    state: State

    def __init__(self, role: Role, on_moved: Callable[[Moved], None] | None = None) -> None:
        self.role = role
        self._on_moved = on_moved
        self.machine = AsyncMachine(
            model=self,
            states=list(State),
            transitions=[
                {"trigger": t.trigger.value, "source": t.source, "dest": t.dest}
                for t in table_for(role)
            ],
            initial=State.INIT,
            auto_transitions=False,
            queued=True,
            send_event=True,
            ignore_invalid_triggers=False,
            after_state_change="_after_state_change",
        )

    def allowed(self, trigger: Trigger) -> bool:
        return trigger.value in self.machine.get_triggers(self.state)

    async def fire(self, trigger: Trigger, reason: str) -> State:
        """Apply `trigger`; raise `MachineError` when the table does not allow it."""
        if not self.allowed(trigger):
            raise MachineError(
                f"trigger {trigger.value!r} is not allowed in state {self.state.value}"
            )
        await self.trigger(trigger.value, reason=reason)
        return self.state

    def _after_state_change(self, event) -> None:  # called by transitions
        moved = Moved(
            source=State(event.transition.source),
            dest=State(event.transition.dest),
            trigger=Trigger(event.event.name),
            reason=event.kwargs.get("reason", ""),
        )
        if self._on_moved is not None:
            self._on_moved(moved)


__all__ = ["Lifecycle", "MachineError", "Moved"]
