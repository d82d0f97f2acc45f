"""The gateway's vocabulary for what became of a request, shared with /metrics:
why an answer was continued on another replica, and why the gateway failed one."""

# A disconnect: reset or closed mid-answer (or before its response began, once the
# request was sent); a stall: no progress, confirmed from the engine's counters; a
# drain: its replica's drain deadline passed.
CONTINUATION_REASONS = ("disconnect", "stall", "drain")
FAILURE_CAUSES = ("unavailable", "not_continuable", "query_of_death", "continuations_exhausted", "no_replica",
                  "timeout")
