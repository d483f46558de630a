"""thpctl map PID [--png FILE]: a picture of a process's address space, one cell per 2 MiB range
of each VMA, coloured by what maps it: a PMD (the goal), a PTE table the remapper marked for a
collapse retry, other PTE-mapped THP subpages (a pte-mapped THP), small pages only, or nothing.

On a terminal it is a heat string per VMA (as damo's), 64 cells to a line with the address of
the first, and a legend; ``--png FILE`` draws the same cells with a legend (matplotlib, Agg).
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Sequence
from typing import Any

from shared.errors import UserError
from shared.protocol import messages as m
from shared.thpctl.cli import REMAPD, Outcome, command, failed, ok, req
from shared.units import HPAGE_PMD_SIZE

# Cell letter -> (what it means, colour).
KINDS: dict[str, tuple[str, str]] = {
    "P": ("PMD-mapped", "#2ca02c"),
    "M": ("marked for retry", "#ff7f0e"),
    "T": ("pte-mapped THP", "#d62728"),
    "s": ("small pages", "#1f77b4"),
    ".": ("empty", "#e0e0e0"),
}
ANSI = {"P": "\x1b[42m", "M": "\x1b[43m", "T": "\x1b[41m", "s": "\x1b[44m", ".": "\x1b[47m"}
PER_LINE = 64


def legend() -> str:
    return "legend: " + "  ".join(f"{k} {what}" for k, (what, _) in KINDS.items())


def render_text(rows: Sequence[dict[str, Any]], color: bool = False) -> str:
    lines = []
    for row in rows:
        counts = Counter(row["cells"])
        summary = " ".join(f"{k}{counts[k]}" for k in KINDS if counts[k])
        lines.append(f"{row['start']:x}-{row['end']:x} {row['perms']} {row['path']}  [{summary}]")
        base = row["start"] & ~(HPAGE_PMD_SIZE - 1)
        cells = row["cells"]
        for i in range(0, len(cells), PER_LINE):
            chunk = cells[i : i + PER_LINE]
            if color:
                chunk = "".join(f"{ANSI[c]}{c}\x1b[0m" for c in chunk)
            lines.append(f"  {base + i * HPAGE_PMD_SIZE:016x} {chunk}")
    lines.append(legend())
    return "".join(line + "\n" for line in lines)


def render_png(rows: Sequence[dict[str, Any]], path: str, title: str = "") -> list[tuple[float, float, str]]:
    """Draw the cells and a legend into ``path``; returns each cell's centre in image pixels
    (x, y from the top left) and its colour, in the order drawn (row by row)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    lines: list[tuple[str, str]] = []  # (label, cells) per drawn line
    for row in rows:
        base = row["start"] & ~(HPAGE_PMD_SIZE - 1)
        for i in range(0, max(len(row["cells"]), 1), PER_LINE):
            label = f"{row['path'] or '?'} {base + i * HPAGE_PMD_SIZE:#x}"
            lines.append((label, row["cells"][i : i + PER_LINE]))
    width = max((len(c) for _, c in lines), default=1)
    fig, ax = plt.subplots(figsize=(max(8.0, 3 + width * 0.2), 1.6 + 0.3 * len(lines)), dpi=100)
    for y, (_, cells) in enumerate(lines):
        for x, c in enumerate(cells):
            ax.add_patch(Rectangle((x + 0.05, y + 0.05), 0.9, 0.9, facecolor=KINDS[c][1], edgecolor="none"))
    ax.set_xlim(0, width)
    ax.set_ylim(len(lines), 0)
    ax.set_yticks([y + 0.5 for y in range(len(lines))], [label for label, _ in lines], fontsize=8)
    ax.set_xticks([])
    ax.set_xlabel("2 MiB ranges")
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=10)
    handles = [Patch(facecolor=colour, label=what) for what, colour in KINDS.values()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.canvas.draw()
    height = fig.canvas.get_width_height()[1]
    centres = []
    for y, (_, cells) in enumerate(lines):
        for x, c in enumerate(cells):
            px, py = ax.transData.transform((x + 0.5, y + 0.5))
            centres.append((float(px), float(height - py), KINDS[c][1]))
    fig.savefig(path)
    plt.close(fig)
    return centres


def _render(args: argparse.Namespace, results: list[Any]) -> Outcome:
    rows = results[0]
    if args.png:
        try:
            render_png(rows, args.png, f"process {args.pid}")
        except OSError as err:
            return failed(UserError("EIO", f"{args.png}: {err.strerror or err}"))
        except ImportError:
            return failed(UserError("ENOPKG", "--png needs matplotlib (pip install 'thpsplit[plot]')"))
        return ok(rows, f"{args.png}\n")
    return ok(rows, render_text(rows, color=getattr(args, "color", False)))


def register(sub: Any) -> None:
    p = command(
        sub,
        "map",
        "a picture of PID's VMAs, one cell per 2 MiB: PMD-mapped, marked for retry, pte-mapped THP, "
        "small pages, empty (text, or --png FILE)",
        lambda a: [req(REMAPD, m.PmdMap, pid=a.pid)],
        _render,
        "map 1 --png map.png",
    )
    p.add_argument("pid", type=int, metavar="PID", help="the modelled process")
    p.add_argument("--png", metavar="FILE", help="draw a PNG with a legend instead")
    p.add_argument("--color", action="store_true", help="colour the cells with ANSI escapes")
