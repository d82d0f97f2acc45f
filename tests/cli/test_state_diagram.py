"""The committed state diagram (docs/state-diagram.md) is the tables' own: it
fails when someone edits states/lifecycle.py and forgets `python scripts/state_diagram.py`."""

import importlib.util
import subprocess
import sys
from pathlib import Path

from states.lifecycle import HEAD_TABLE, Role

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "state_diagram.py"
_spec = importlib.util.spec_from_file_location("state_diagram", SCRIPT)
diagram = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diagram)


def test_the_committed_diagram_matches_the_tables():
    assert diagram.MARKDOWN.read_text() == diagram.markdown(), "run: python scripts/state_diagram.py"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_transition_of_the_tables_is_in_the_diagram():
    text = diagram.mermaid(Role.HEAD)
    for t in HEAD_TABLE:
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(f"{t.source.value} --> {t.dest.value}:"))
        assert t.trigger.value in line


def test_a_stale_diagram_is_caught(tmp_path, monkeypatch):
    stale = tmp_path / "state-diagram.md"
    stale.write_text(diagram.markdown().replace("recovered", "healed"))
    monkeypatch.setattr(diagram, "MARKDOWN", stale)
    assert diagram.main(["--check"]) == 1
