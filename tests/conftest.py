"""Fixtures for every test folder."""

from __future__ import annotations

import json
import os

import pytest


@pytest.fixture
def chaos_report(request):
    """Record a fault's figures: printed, and appended as a JSON line to $CHAOS_REPORT
    (scripts/chaos.sh sums them up over its runs)."""
    def record(fault: str, **figures) -> None:
        entry = {"test": request.node.nodeid, "fault": fault, "run": int(os.environ.get("CHAOS_RUN", "0")) or None,
                 **{k: (round(v, 2) if isinstance(v, float) else v) for k, v in figures.items()}}
        print(f"chaos: {json.dumps(entry)}")
        path = os.environ.get("CHAOS_REPORT")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(entry) + "\n")
    return record
