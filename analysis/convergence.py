"""Convergence curves: error or residual per iteration, one curve per solve, as a record, a table and a plot."""

from __future__ import annotations

import math
from typing import Mapping

import torch

import layersolve as ls


def _max_per_iterate(x: torch.Tensor | None) -> list[float]:
    """Largest entry over layers of each row; NaN for rows that were not evaluated."""
    if x is None:
        return []
    return [float(row.max()) if not torch.isnan(row).any() else math.nan for row in x]


def convergence_record(stats: ls.Stats) -> dict:
    """A JSON-ready record of one solve: counts and the per-iterate maxima over layers."""
    return {
        "iterations": stats.iterations,
        "evaluations": stats.evaluations,
        "jvps": stats.jvps,
        "depth": stats.depth,
        "fallback_layers": stats.fallback_layers,
        "residual": _max_per_iterate(stats.residual),
        "error": _max_per_iterate(stats.error),
        "exact_prefix": stats.exact_prefix.tolist(),
    }


def convergence_table(runs: Mapping[str, ls.Stats], quantity: str = "error", columns: int = 10) -> str:
    """Rows: solves; columns: iterations of `quantity` ("error" or "residual"), max over layers. Past `columns`
    iterations, every few iterations are shown, always with the first and the last; "-" marks a solve that had
    stopped or a row that was not evaluated."""
    curves = {name: _max_per_iterate(getattr(stats, quantity)) for name, stats in runs.items()}
    width = max((len(c) for c in curves.values()), default=0)
    stride = max(1, math.ceil((width - 1) / max(columns - 1, 1)))
    ks = sorted(set(range(0, width, stride)) | ({width - 1} if width else set()))
    name_width = max([len(n) for n in curves] + [8])
    header = f"{'solve':<{name_width}} " + " ".join(f"{f'k={k}':>8}" for k in ks) + f" {'iters':>6} {'final':>8}"
    lines = [f"max relative {quantity} over layers, per iteration", header, "-" * len(header)]
    for name, curve in curves.items():
        cells = [f"{curve[k]:8.1e}" if k < len(curve) and not math.isnan(curve[k]) else f"{'-':>8}" for k in ks]
        last = next((k for k in reversed(range(len(curve))) if not math.isnan(curve[k])), None)
        final = f"{last:>6} {curve[last]:8.1e}" if last is not None else f"{'-':>6} {'-':>8}"
        lines.append(f"{name:<{name_width}} " + " ".join(cells) + " " + final)
    return "\n".join(lines)


def plot_convergence(runs: Mapping[str, ls.Stats], quantity: str = "error", title: str = ""):
    """Semilog plot of `quantity` (max over layers) against iterations, one line per solve: a matplotlib Figure
    (the caller saves it; `models.io.save_figure` writes it atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, stats in runs.items():
        curve = _max_per_iterate(getattr(stats, quantity))
        points = [(k, v) for k, v in enumerate(curve) if not math.isnan(v) and v > 0]
        if points:
            ax.semilogy(*zip(*points), marker="o", markersize=3, label=name)
    ax.set_xlabel("iteration k")
    ax.set_ylabel(f"max relative {quantity} over layers")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
