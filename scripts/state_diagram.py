"""The lifecycle state diagrams, drawn from the transition tables.

Mermaid text comes from `transitions`' graph extension (its mermaid engine:
no Graphviz needed); the PNG is drawn from the same tables with matplotlib.
`docs/state-diagram.md` and `docs/state-diagram-{head,worker}.png` are these
outputs, committed; a test fails when they and the tables disagree.

    python scripts/state_diagram.py            # rewrite the docs from the tables
    python scripts/state_diagram.py --check    # exit 1 when the committed Markdown is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from transitions.extensions.diagrams import GraphMachine

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from states.lifecycle import Role, State, Trigger, table_for  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
MARKDOWN = DOCS / "state-diagram.md"

# Where each state sits in the picture (x, y): the happy path left to right,
# trouble below it, the way out at the bottom.
LAYOUT = {
    State.INIT: (0, 2), State.JOINING: (1.6, 2), State.WAITING_FOR_WORKERS: (3.4, 2), State.SERVING: (5.2, 2),
    State.DEGRADED: (5.2, 0.8), State.DRAINING: (2.6, -0.4), State.STOPPED: (5.2, -0.4),
}
# Edges every live state has: drawn faint, labelled once.
EVERYWHERE = (Trigger.DRAIN, Trigger.FATAL)


def mermaid(role: Role) -> str:
    """The role's table as a mermaid stateDiagram, by `transitions`' graph extension."""

    class Model:
        pass

    model = Model()
    GraphMachine(model=model, states=[s.value for s in State],
                 transitions=[{"trigger": t.trigger.value, "source": t.source.value, "dest": t.dest.value}
                              for t in table_for(role)],
                 initial=State.INIT.value, auto_transitions=False, graph_engine="mermaid",
                 title=f"{role.value} lifecycle")
    text = model.get_graph().draw(None).strip() + "\n"
    # The extension writes the title as bare front matter; mermaid reads `title:`.
    bare = f"---\n{role.value} lifecycle\n---\n"
    assert text.startswith(bare), text[:80]
    return f"---\ntitle: {role.value} lifecycle\n---\n" + text[len(bare):]


def markdown() -> str:
    parts = ["# Lifecycle state diagrams\n\n",
             "Generated from the transition tables in `states/lifecycle.py` by `python scripts/state_diagram.py`; "
             "do not edit by hand (a test compares this file with the tables).\n"]
    for role in Role:
        parts.append(f"\n## {role.value}\n\n![{role.value} lifecycle](state-diagram-{role.value}.png)\n\n"
                     f"```mermaid\n{mermaid(role)}```\n")
    return "".join(parts)


def draw_png(role: Role, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 5))
    ax.set_xlim(-0.9, 6.2)
    ax.set_ylim(-1.0, 2.6)
    ax.axis("off")
    boxes = {}
    for state, (x, y) in LAYOUT.items():
        boxes[state] = ax.text(x, y, state.value, ha="center", va="center", fontsize=9, zorder=3,
                bbox={"boxstyle": "round,pad=0.4", "facecolor": "azure" if state is not State.STOPPED else "mistyrose",
                      "edgecolor": "black"})
    labels: dict[tuple[State, State], list[str]] = {}
    labelled_once: set[Trigger] = set()
    for t in table_for(role):
        labels.setdefault((t.source, t.dest), []).append(t.trigger.value)
    for (src, dst), triggers in labels.items():
        faint = all(Trigger(tr) in EVERYWHERE for tr in triggers)
        (x1, y1), (x2, y2) = LAYOUT[src], LAYOUT[dst]
        pair = {src, dst}
        rad = 0.3 if pair == {State.SERVING, State.DEGRADED} else 0.0 if y1 == y2 and not faint else 0.12
        ax.annotate("", xy=(x2, y2), xytext=(x1, y1), zorder=1,
                    arrowprops={"arrowstyle": "-|>", "color": "lightgrey" if faint else "black",
                                "patchA": boxes[src].get_bbox_patch(), "patchB": boxes[dst].get_bbox_patch(),
                                "shrinkA": 2, "shrinkB": 2, "connectionstyle": f"arc3,rad={rad}",
                                "linewidth": 0.8 if faint else 1.2})
        text = " | ".join(triggers)
        if faint:
            trigger = Trigger(triggers[0])
            if trigger in labelled_once:
                continue
            labelled_once.add(trigger)
            text = f"{trigger.value} (from every state before it)"
        # The middle of matplotlib's arc3 curve: the chord's middle, pushed sideways by rad/2.
        dx, dy = x2 - x1, y2 - y1
        mx, my = (x1 + x2) / 2 + rad * dy / 2, (y1 + y2) / 2 - rad * dx / 2
        side = "center" if abs(mx - (x1 + x2) / 2) < 0.05 else "left" if mx > (x1 + x2) / 2 else "right"
        ax.text(mx, my + 0.06, text, ha=side, va="bottom", fontsize=7, color="dimgrey" if faint else "black",
                zorder=2, bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none"})
    ax.set_title(f"{role.value} lifecycle (from states/lifecycle.py)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/state-diagram.md is stale")
    args = parser.parse_args(argv)
    if args.check:
        if not MARKDOWN.exists() or MARKDOWN.read_text() != markdown():
            print(f"{MARKDOWN} disagrees with states/lifecycle.py: run python scripts/state_diagram.py", file=sys.stderr)
            return 1
        return 0
    DOCS.mkdir(exist_ok=True)
    MARKDOWN.write_text(markdown())
    for role in Role:
        draw_png(role, DOCS / f"state-diagram-{role.value}.png")
    print(f"wrote {MARKDOWN} and its PNGs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
