"""Speed-quality frontiers: each plan a point of measured speedup against quality, from the evaluation grids that
`snlp eval` and `snlp demo` write (rows keyed by plan name, with a "sequential" row) or the rows `snlp bench`
writes, and the plans on the Pareto front: those that no other plan beats on both speed and quality."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import layersolve as ls

from ._labels import name_points
from ._plot import SMALL, figure, style

SEQUENTIAL = "sequential"  # the name of the reference row, in grids and in bench results


@dataclass(frozen=True)
class FrontierPoint:
    """One plan: its measured speedup over the sequential forward, its quality (ppl, bpb, or a logit difference:
    lower is better unless said otherwise), the group it belongs to (a model, a shape) and whether its solve ended
    ok. A point whose solve failed keeps its numbers but never makes the front: its logits are not the model's.
    NaN speedup or quality: not measured (not on the front, not drawn)."""

    name: str
    speedup: float
    quality: float
    group: str = ""
    ok: bool = True

    @property
    def measured(self) -> bool:
        return math.isfinite(self.speedup) and math.isfinite(self.quality)


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _solve_ok(row: Mapping) -> bool:
    """A grid or bench row's solve ended ok: its "result" is the worst over batches, so one failed batch makes it
    not ok. The sequential row has no solve."""
    return "result" not in row or ls.Result[row["result"]].ok


def frontier_points(grid: Mapping[str, Mapping], speedups: Mapping[str, float] | None = None, quality: str = "ppl",
                    group: str = "") -> list[FrontierPoint]:
    """A point per grid row (the sequential row included, at 1.0x by definition), in the grid's order.

    quality:  a key of the rows' "quality" ("ppl", "bpb", "loss").
    speedups: plan name -> measured speedup (e.g. from a benchmark on the target device); default each row's own
              "speedup" (the evaluation's wall time ratio). A plan missing from the mapping gets NaN.
    """
    points = []
    for name, row in grid.items():
        measured = row.get("speedup") if speedups is None else speedups.get(name)
        speedup = 1.0 if name == SEQUENTIAL else _number(measured)
        values = row.get("quality") or {}
        if values and quality not in values:
            raise ValueError(f"quality must be one of the grid's quality keys {sorted(values)}, got {quality!r}")
        points.append(FrontierPoint(name, speedup, _number(values.get(quality)), group, _solve_ok(row)))
    return points


def bench_points(rows: Iterable[Mapping], quality: str = "max_abs_logit_diff", group: str = "") -> list[FrontierPoint]:
    """A point per `snlp bench` row: its speedup over the fastest sequential way of its table (the row's
    "baseline"; None, i.e. not measured, becomes NaN) and the row's `quality` column (default the largest logit
    difference from the sequential forward, lower is better; "top1_agreement" is higher-better)."""
    return [FrontierPoint(row["case"], _number(row["speedup"]), _number(row.get(quality)), group, _solve_ok(row))
            for row in rows]


def pareto_front(points: Iterable[FrontierPoint], lower_is_better: bool = True) -> list[FrontierPoint]:
    """The measured, ok points that no other such point dominates (at least as fast and at least as good, and
    strictly better in one), by increasing speedup. Equal points do not dominate each other: both stay."""
    sign = 1.0 if lower_is_better else -1.0
    candidates = [p for p in points if p.measured and p.ok]

    def dominates(a: FrontierPoint, b: FrontierPoint) -> bool:
        qa, qb = sign * a.quality, sign * b.quality
        return a.speedup >= b.speedup and qa <= qb and (a.speedup > b.speedup or qa < qb)

    front = [p for p in candidates if not any(dominates(q, p) for q in candidates)]
    return sorted(front, key=lambda p: (p.speedup, p.name))


def plot_frontier(points: Sequence[FrontierPoint], quality_label: str = "validation perplexity",
                  baseline: str = "sequential", lower_is_better: bool = True, title: str = ""):
    """Quality against speedup, one colour per group; failed solves as crosses; the Pareto front of each group as
    a line, its plans and the failed ones named (naming every plan buries the front under overlapping names; the
    rest are in the caller's table); the sequential point at 1.0x on a dotted line. No two names overprint: where
    points crowd, a name moves off its point on a leader line, or goes by a number listed in the legend
    (name_points). Unmeasured points are counted in a note, not drawn. A log quality axis when the values span more
    than a factor 10."""
    fig, [ax] = figure()
    groups = list(dict.fromkeys(p.group for p in points))
    drawn = [p for p in points if p.measured]
    named = []  # (speedup, quality, name): named once the axes are final, in name_points
    ax.axvline(1.0, color="grey", linestyle=":", label=f"{baseline} (1.0x)")
    for i, group in enumerate(groups):
        color, mine = f"C{i}", [p for p in drawn if p.group == group]
        prefix = f"{group}: " if group else ""
        for ok, marker, kind in ((True, "o", "plans"), (False, "x", "failed solves")):
            chosen = [p for p in mine if p.ok == ok and p.name != SEQUENTIAL]
            if chosen:
                ax.scatter([p.speedup for p in chosen], [p.quality for p in chosen], color=color, marker=marker,
                           label=prefix + kind)
        front = pareto_front(mine, lower_is_better)
        for p in mine:
            if p.name == SEQUENTIAL:
                ax.scatter([p.speedup], [p.quality], color=color, marker="*", s=150, zorder=3,
                           label=prefix + SEQUENTIAL)
            elif p in front or not p.ok:
                named.append((p.speedup, p.quality, p.name))
        if len(front) > 1:
            ax.plot([p.speedup for p in front], [p.quality for p in front], color=color, linewidth=1.5, alpha=0.6,
                    label=prefix + "Pareto front")
    ax.margins(x=0.15, y=0.08)  # room for the names of the outermost points
    qualities = [p.quality for p in drawn if p.quality > 0]
    if qualities and max(qualities) > 10 * min(qualities):
        ax.set_yscale("log")
    if len(drawn) < len(points):
        ax.text(0.01, 0.01, f"{len(points) - len(drawn)} plan(s) without a measured speedup or quality not shown",
                transform=ax.transAxes, fontsize=SMALL, color="grey")
    style(ax, f"speedup over sequential (x, baseline: {baseline})", quality_label, title)
    name_points(ax, named)
    return fig
