"""Convergence of solves, from their `ls.Stats`: the error or residual per iteration (max over layers, one curve
per solve) as a record, a table and a plot; per layer, as curves and as a layer x iteration heatmap (where the
front of exact layers shows as a diagonal); and the exact-prefix front against finite termination's guarantee."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch

import layersolve as ls

from ._plot import SMALL, figure, style

QUANTITIES = ("residual", "error")


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


def layer_curves(stats: ls.Stats, quantity: str = "error") -> torch.Tensor:
    """(iters+1, L) relative `quantity` ("error" or "residual") per iterate (rows) and layer (columns), float64;
    a NaN row was not evaluated. The stats' own numbers: the per-layer plot and the heatmap draw exactly these."""
    if quantity not in QUANTITIES:
        raise ValueError(f"quantity must be one of {QUANTITIES}, got {quantity!r}")
    values = getattr(stats, quantity)
    if values is None:
        raise ValueError("these stats have no error: solve with reference=<the exact trace> to record it")
    return values.to(torch.float64).clone()


def prefix_front(stats: ls.Stats) -> list[tuple[int, int]]:
    """(k, exact prefix after k iterations) for every iterate. Finite termination guarantees prefix >= min(k, L);
    a solve that is ahead of that line gained layers from convergence, not only from the exactness front."""
    return [(k, int(p)) for k, p in enumerate(stats.exact_prefix)]


def _positive(values) -> np.ndarray:
    """The values as a float array with non-positive entries NaN: a log axis cannot show an exact 0."""
    values = np.asarray(values, dtype=np.float64)
    return np.where(values > 0, values, np.nan)


def plot_convergence(runs: Mapping[str, ls.Stats], quantity: str = "error", title: str = ""):
    """Semilog plot of `quantity` (max over layers) against iterations, one line per solve: a matplotlib Figure
    (the caller saves it; `models.io.save_figure` writes it atomically)."""
    fig, [ax] = figure()
    for name, stats in runs.items():
        ax.semilogy(_positive(_max_per_iterate(getattr(stats, quantity))), marker="o", markersize=3, label=name)
    style(ax, "iteration k", f"relative {quantity} (max over layers)", title, integer="x")
    return fig


def plot_layer_convergence(stats: ls.Stats, quantity: str = "error", title: str = ""):
    """Left: `quantity` against iterations, one line per layer (coloured by depth) and the max over layers.
    Right: the last evaluated iterate's value per layer, which shows where in depth the remaining error sits."""
    import matplotlib

    curves = layer_curves(stats, quantity).numpy()
    fig, (left, right) = figure(ncols=2)
    cmap = matplotlib.colormaps["viridis"]
    for layer in range(curves.shape[1]):
        left.semilogy(_positive(curves[:, layer]), color=cmap(layer / max(curves.shape[1] - 1, 1)), linewidth=1)
    left.semilogy(_positive(_max_per_iterate(torch.from_numpy(curves))), color="black", linewidth=2, marker="o",
                  markersize=3, label="max over layers")
    bar = fig.colorbar(matplotlib.cm.ScalarMappable(matplotlib.colors.Normalize(1, curves.shape[1]), cmap), ax=left)
    bar.set_label("layer l", fontsize=SMALL)
    bar.ax.tick_params(labelsize=SMALL)
    style(left, "iteration k", f"relative {quantity} per layer", title, legend=True, integer="x")
    layers = np.arange(1, curves.shape[1] + 1)
    evaluated = [k for k in range(curves.shape[0]) if not np.isnan(curves[k]).all()]
    if evaluated:
        k = evaluated[-1]
        right.semilogy(layers, _positive(curves[k]), marker="o", markersize=3, label="> 0")
        exact = layers[curves[k] == 0]
        if len(exact):  # exact layers have no place on a log axis: marked along its bottom edge
            right.plot(exact, np.full(len(exact), 0.02), "v", color="C2", transform=right.get_xaxis_transform(),
                       label="exactly 0")
        style(right, "layer l", f"relative {quantity} at iteration k={k}", f"last evaluated iterate (k={k})",
              integer="x")
    else:
        style(right, "layer l", f"relative {quantity}", "no iterate was evaluated", integer="x")
    right.set_xlim(0.5, curves.shape[1] + 0.5)
    return fig


def plot_heatmap(stats: ls.Stats, quantity: str = "residual", title: str = "", first_layer: int = 1):
    """log10 of `quantity` over layers (x, numbered from `first_layer`: a model's own numbers for a solve of its
    last layers) and iterations (y, k = 0 at the top). Iterates that were not evaluated at all (the residual of the
    last one, usually) have no row; cells exactly 0, which a log scale cannot show, are grey."""
    import matplotlib

    curves = layer_curves(stats, quantity).numpy()
    evaluated = ~np.isnan(curves).all(axis=1)
    rows = np.flatnonzero(evaluated)
    curves = curves[: rows[-1] + 1] if len(rows) else curves[:0]
    with np.errstate(invalid="ignore", divide="ignore"):
        logs = np.log10(_positive(curves))
    fig, [ax] = figure()
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="lightgrey")
    last = first_layer + curves.shape[1] - 1
    image = ax.imshow(np.ma.masked_invalid(logs), aspect="auto", cmap=cmap, interpolation="nearest",
                      extent=(first_layer - 0.5, last + 0.5, curves.shape[0] - 0.5, -0.5))
    grey = [why for why, cells in (("exactly 0", curves == 0), ("not evaluated", np.isnan(curves))) if cells.any()]
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"log10 relative {quantity}" + (f" (grey: {' or '.join(grey)})" if grey else ""), fontsize=SMALL)
    bar.ax.tick_params(labelsize=SMALL)
    dropped = [k for k in range(len(evaluated)) if k >= curves.shape[0]]
    if dropped:
        ax.text(0.01, -0.12, f"iterate k={', '.join(map(str, dropped))}: {quantity} not evaluated (no row)",
                transform=ax.transAxes, fontsize=SMALL, color="grey")
    style(ax, "layer l (of the model)" if first_layer > 1 else "layer l", "iteration k", title, integer="xy")
    ax.grid(False)
    return fig


def plot_prefix_front(runs: Mapping[str, ls.Stats], title: str = ""):
    """Exact prefix against iterations, one step line per distinct front, beside the guarantee min(k, L) of finite
    termination (L: the deepest of the solves). Solves with the same front share one line, and the legend names
    them all (and says so where they lie on the guarantee): curves drawn over each other would show one colour."""
    fig, [ax] = figure()
    last = max((len(s.exact_prefix) for s in runs.values()), default=1) - 1
    depth = max((s.num_layers for s in runs.values()), default=0)
    ks = np.arange(last + 1)
    guarantee = tuple(int(p) for p in np.minimum(ks, depth))
    fronts: dict[tuple, list[str]] = {}
    for name, stats in runs.items():
        fronts.setdefault(tuple(p for _, p in prefix_front(stats)), []).append(name)
    on_guarantee = [name for front in [f for f in fronts if f == guarantee[:len(f)]] for name in fronts.pop(front)]
    label = "guaranteed: min(k, L)" + (f" = {', '.join(on_guarantee)}" if on_guarantee else "")
    ax.step(ks, guarantee, where="post", color="grey", linestyle="--", marker="o" if on_guarantee else None,
            markersize=3, label=label)
    for front, names in fronts.items():
        ax.step(range(len(front)), front, where="post", marker="o", markersize=3,
                label=", ".join(names) + (" (identical)" if len(names) > 1 else ""))
    style(ax, "iteration k", "exact prefix (layers within prefix_tol)", title, integer="xy", legend=True)
    return fig
