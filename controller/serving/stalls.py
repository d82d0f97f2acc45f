"""When a replica's silence is suspicious: token progress as the gateway sees it.

The gateway reads every answer as a stream, so it sees each token arrive. A
replica is suspected of a stall when it has requests in flight and none of
them made progress for longer than a deadline learned from the replica's own
recent inter-token gaps (a multiple of the longest of them, never under a
floor), plus an allowance for prefill that grows with the longest prompt still
waiting for its first token. A suspicion is only that: the gateway confirms it
from the engine's own counters before it calls the replica stalled (a decoding
engine's counters move; the gateway's own event loop may be the slow one; a
replica whose requests all still await their first token may be in a long
prefill, which vLLM counts only at its end).

Plain Python: no I/O, times passed in.
"""

from __future__ import annotations

from collections import deque

# No silence shorter than this is suspicious: the head's own event loop was seen
# stalled 0.35-0.77 s on a loaded 2-core machine, and a stream then arrives late.
STALL_FLOOR_S = 1.0
# Silence this many times the replica's longest recent inter-token gap (the
# engine's counters confirm a suspicion, so a tight deadline costs two reads).
GAP_FACTOR = 2.0
RECENT_GAPS = 64
# Prefill allowance per KiB of a prompt that has no first token yet (a 4K-token
# prompt is about 16 KiB of JSON: 1.6 s more).
PREFILL_S_PER_KIB = 0.1
# When every request on a replica awaits its first token, its silence is judged
# against its own recent times to a first token; this, before it has any (an
# engine just started, under a burst: one took over 1 s here).
FIRST_TOKEN_UNLEARNED_S = 5.0


class Progress:
    """One replica's token progress: when it last made any, its recent inter-token
    gaps, and its recent times to a first token."""

    __slots__ = ("last", "gaps", "firsts", "waiting")

    def __init__(self) -> None:
        self.last: float | None = None  # the last token, or when the replica became busy
        self.gaps: deque[float] = deque(maxlen=RECENT_GAPS)
        self.firsts: deque[float] = deque(maxlen=RECENT_GAPS)  # request sent -> its first token
        # request (id of its flight) -> (when sent, prompt bytes), until its first token
        self.waiting: dict[int, tuple[float, int]] = {}

    def busy(self, now: float) -> None:
        """The replica got a request while it had none: silence counts from now."""
        self.last = now

    def sent(self, flight: int, now: float, prompt_bytes: int) -> None:
        self.waiting[flight] = (now, prompt_bytes)

    def token(self, flight: int, now: float, gap: float | None) -> None:
        """A request made progress; `gap`: since its own previous token (None: its first)."""
        waited = self.waiting.pop(flight, None)
        if waited is not None:
            self.firsts.append(now - waited[0])
        self.last = now
        if gap is not None:
            self.gaps.append(gap)

    def ended(self, flight: int) -> None:
        self.waiting.pop(flight, None)

    def longest_gap(self) -> float:
        return max(self.gaps) if self.gaps else 0.0

    def deadline(self, mid_answer: bool) -> float:
        """How long this replica may stay silent with requests in flight: a multiple
        of its longest recent gap while some request is mid-answer, else of its
        longest recent time to a first token (FIRST_TOKEN_UNLEARNED_S before it has
        any: a new engine under a burst), plus the prefill allowance."""
        if mid_answer:
            learned = GAP_FACTOR * self.longest_gap()
        else:
            learned = GAP_FACTOR * max(self.firsts) if self.firsts else FIRST_TOKEN_UNLEARNED_S
        prefill = PREFILL_S_PER_KIB * max(b for _, b in self.waiting.values()) / 1024 if self.waiting else 0.0
        return max(STALL_FLOOR_S, learned) + prefill

    def silent_for(self, now: float) -> float:
        return 0.0 if self.last is None else now - self.last

    def suspicious(self, now: float, in_flight: int, mid_answer: bool) -> bool:
        return in_flight > 0 and self.silent_for(now) > self.deadline(mid_answer)
