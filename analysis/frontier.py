"""Speed-quality frontiers: validation perplexity against Newton iterations K, per strategy and model, from the
evaluation grids that `snlp eval` and `snlp demo` write (plan names such as 'IDN n4 K2 repeat')."""

from __future__ import annotations

import re
from typing import Mapping

PLAN_K = re.compile(r"^(?P<method>\S+) n\d+ K(?P<k>\d+)\b")


def frontier_points(grid: Mapping[str, dict], method: str) -> list[tuple[int, float]]:
    """(K, perplexity) of the grid's unfused plans of one method ('IDN', 'Jacobi', ...), sorted by K."""
    points = []
    for name, row in grid.items():
        m = PLAN_K.match(name)
        if m and m.group("method") == method:
            points.append((int(m.group("k")), row["quality"]["ppl"]))
    return sorted(points)


def plot_frontier(grids: Mapping[str, Mapping[str, dict]], methods=("Jacobi", "IDN")):
    """Validation perplexity against K, one colour per model (grids: model name -> evaluation grid), a dotted line
    at each model's sequential perplexity: a matplotlib Figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ks = set()
    for i, (name, grid) in enumerate(grids.items()):
        color = f"C{i}"
        ax.axhline(grid["sequential"]["quality"]["ppl"], color=color, linestyle=":", label=f"{name}: sequential")
        for method, style in zip(methods, ("--", "-", "-.", ":")):
            points = frontier_points(grid, method)
            if points:
                ks.update(k for k, _ in points)
                ax.plot(*zip(*points), style, color=color, marker="o", label=f"{name}: {method}")
    ax.set_yscale("log")
    ax.set_xticks(sorted(ks))
    ax.set_xlabel("Newton iterations K over the parallel tail")
    ax.set_ylabel("validation perplexity")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return fig
