"""The experiment's picture: PMD-mapped coverage over virtual time and the final figures.

One row of panels per (source, variant) of the summary (:func:`shared.sim.experiment.summarise`):

1. PMD-mapped coverage (% of the eligible ranges at each sample) over virtual time, one line
   per policy (the mean over seeds; the band between the seeds' min and max when there are
   several);
2. PMD-mapped at the end (%), a bar per policy (error bar: stdev over seeds);
3. the work each policy did to get there — retract attempts, trylock failures, retries, wasted
   scans, pte-mapped THPs left — grouped bars per policy (log scale).

matplotlib is imported here only, with the Agg backend (no display needed).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

POLICY_COLOURS = {
    "per-pmd": "#1f77b4",
    "mm-slot": "#ff7f0e",
    "per-mapping": "#d62728",
    "lockless": "#2ca02c",
    "none": "#7f7f7f",
}
# Lines of different policies often coincide: the style tells them apart where they do.
POLICY_STYLES = {"per-pmd": "-", "mm-slot": "--", "per-mapping": "-.", "lockless": ":", "none": (0, (5, 2, 1, 2, 1, 2))}
WORK = (
    ("retract_attempts", "retract attempts"),
    ("retract_deferred", "trylock failures"),
    ("retries", "retries"),
    ("wasted_scans", "wasted scans"),
    ("pte_mapped_thp", "pte-mapped THPs left"),
)
WORK_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


def plot_experiment(summary: Sequence[dict[str, Any]], path: str | os.PathLike[str] | None = None,
                    dpi: int = 80) -> Any:
    """Draw the summary; save it as PNG at ``path`` (if given) and return the Figure."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    blocks: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for e in summary:
        blocks.setdefault((e["source"], e["variant"]), []).append(e)
    rows = max(1, len(blocks))
    fig = Figure(figsize=(15, 3.8 * rows), dpi=dpi, layout="constrained")
    axes = fig.subplots(rows, 3, squeeze=False, width_ratios=(2.2, 1, 1.6))
    for row, ((source, variant), entries) in enumerate(blocks.items()):
        title = os.path.basename(source) + (f" [{variant}]" if variant else "")
        _coverage(axes[row][0], entries, title)
        _final(axes[row][1], entries)
        _work(axes[row][2], entries)
    if path is not None:
        fig.savefig(path, format="png", metadata={"Software": None})
    return fig


def _colour(policy: str) -> str:
    return POLICY_COLOURS.get(policy, "#000000")


def _coverage(ax: Any, entries: list[dict[str, Any]], title: str) -> None:
    for e in entries:
        pts = e["coverage"]
        t = [p[0] / 1000 for p in pts]
        ax.plot(t, [p[1] for p in pts], label=e["policy"], color=_colour(e["policy"]),
                linestyle=POLICY_STYLES.get(e["policy"], "-"), linewidth=1.6)
        if len(e["seeds"]) > 1:
            ax.fill_between(t, [p[2] for p in pts], [p[3] for p in pts], color=_colour(e["policy"]), alpha=0.15,
                            linewidth=0)
    ax.set_title(f"{title}: PMD-mapped coverage")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("PMD-mapped (% of eligible ranges)")
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")


def _final(ax: Any, entries: list[dict[str, Any]]) -> None:
    names = [e["policy"] for e in entries]
    means = [e["figures"]["pmd_mapped_pct"]["mean"] or 0.0 for e in entries]
    sds = [e["figures"]["pmd_mapped_pct"]["sd"] or 0.0 for e in entries]
    x = range(len(names))
    bars = ax.bar(x, means, yerr=sds if any(sds) else None, color=[_colour(n) for n in names], capsize=3)
    for b, v, sd in zip(bars, means, sds):
        ax.annotate(f"{v:.1f}%", (b.get_x() + b.get_width() / 2, v + sd), xytext=(0, 2), textcoords="offset points",
                    ha="center", va="bottom", fontsize="small")
    ax.set_xticks(list(x), names, rotation=20)
    # When every policy ends high, the axis starts near the lowest so that the differences show.
    low = min(means, default=0.0)
    bottom = 0.0 if low < 50 else max(0.0, 10 * ((low - 5) // 10))
    ax.set_ylim(bottom, 100 + (100 - bottom) * 0.1)
    ax.set_title("PMD-mapped at the end" + (f" (axis from {bottom:.0f}%)" if bottom else ""))
    ax.set_ylabel("% of eligible ranges")


def _work(ax: Any, entries: list[dict[str, Any]]) -> None:
    names = [e["policy"] for e in entries]
    width = 0.8 / len(WORK)
    for k, (key, label) in enumerate(WORK):
        values = [max(e["figures"][key]["mean"] or 0.0, 0.0) for e in entries]
        ax.bar([i + (k - (len(WORK) - 1) / 2) * width for i in range(len(names))], [v if v > 0 else 0.0 for v in values],
               width, label=label, color=WORK_COLOURS[k])
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_title("work done and what was left (symlog)")
    ax.set_ylabel("count")
    ax.legend(fontsize="x-small", ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
