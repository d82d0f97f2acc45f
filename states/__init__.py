"""The pure lifecycle core: states, triggers, transition tables, decisions.

Nothing here touches the world: no Ray, no subprocesses, no HTTP, no wall clock.
"""

from states.decide import Decision, Limits, Observation, decide
from states.lifecycle import (
    HEAD_TABLE,
    LIVE_STATES,
    WORKER_TABLE,
    Role,
    State,
    Transition,
    Trigger,
    next_state,
    table_for,
)
from states.machine import Lifecycle, MachineError, Moved

__all__ = [
    "Decision", "Limits", "Observation", "decide",
    "HEAD_TABLE", "LIVE_STATES", "WORKER_TABLE", "Role", "State", "Transition", "Trigger", "next_state", "table_for",
    "Lifecycle", "MachineError", "Moved",
]
