"""The surrogate error: ||J_l - J~_l||_2 per layer for several Jacobian strategies, computed with
`ls.surrogate_error` at one trace and drawn as grouped bars. The mismatch is what a Newton step over depth
propagates, so a strategy with smaller bars converges in fewer iterations (docs/math.md eq. (6))."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

import layersolve as ls

from ._plot import figure, style


def surrogate_errors(system: ls.LayerSystem, trace: torch.Tensor, strategies: Mapping[str, ls.Jacobian],
                     layers: slice | None = None, iters: int = 20, seed: int = 0,
                     relative: bool = False) -> dict[str, torch.Tensor]:
    """name -> (n,) estimate of ||J_l - J~_l||_2 (or that over ||J_l||_2) for each strategy, at the same trace,
    layers and starting vectors (the same seed), so the strategies' bars are comparable."""
    return {name: ls.surrogate_error(system, trace, jacobian, layers=layers, iters=iters, seed=seed,
                                     relative=relative) for name, jacobian in strategies.items()}


def plot_surrogate_error(errors: Mapping[str, torch.Tensor], layer_offset: int = 0, relative: bool = False,
                         title: str = ""):
    """Grouped bars: for each layer, one bar per strategy. layer_offset: the 0-based index of the first layer
    (the `layers.start` the errors were computed for), so the axis shows the model's own layer numbers."""
    sizes = {len(e) for e in errors.values()}
    if len(sizes) > 1:
        raise ValueError(f"errors must all cover the same layers, got lengths {sorted(sizes)}")
    count = sizes.pop() if sizes else 0
    fig, [ax] = figure()
    layers = np.arange(layer_offset + 1, layer_offset + count + 1)
    width = 0.8 / max(len(errors), 1)
    for i, (name, values) in enumerate(errors.items()):
        ax.bar(layers + (i - (len(errors) - 1) / 2) * width, torch.as_tensor(values, dtype=torch.float64).numpy(),
               width=width, label=name)
    ax.set_xticks(layers)
    ylabel = "||J_l - J~_l||_2 / ||J_l||_2" if relative else "||J_l - J~_l||_2 (spectral norm)"
    style(ax, "layer l", ylabel, title)
    return fig
