"""The per-layer update profile: how far each block moves the state, ||f_l(h) - h|| / ||h|| on real text, drawn
as bars on a log axis with a chosen segment shaded. SNLP's identity surrogate assumes each block is the identity
plus a small update, so the profile says where a parallel segment has a chance (`snlp plan`, notebook 05)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ._plot import SMALL, figure, style


def plot_update_profile(profile: Sequence[float], segment: tuple[int, int] | None = None, title: str = ""):
    """Bars of profile[i], the relative update of block i (0-based), on a log axis; `segment` (start, stop):
    the blocks start .. stop - 1 shaded and labelled, as solved in parallel."""
    fig, [ax] = figure()
    blocks = np.arange(len(profile))
    ax.bar(blocks, np.asarray(profile, dtype=np.float64), color="C0")
    ax.set_yscale("log")
    if segment is not None:
        start, stop = segment
        ax.axvspan(start - 0.5, stop - 0.5, color="C1", alpha=0.25, zorder=0,
                   label=f"parallel segment: blocks {start}-{stop - 1}")
        ax.legend(fontsize=SMALL)
    style(ax, "block (0-based)", "relative update ||f(h) - h|| / ||h||", title, integer="x")
    return fig
