"""The house style of every figure: one size (8 x 5 in at 100 dpi, 800 px wide), fonts of at least 9 pt, labelled
axes with units, a legend only where there are several series. Kept in one place so that the figures of a report
match, and the tests can check the style once for all of them."""

from __future__ import annotations

FIGSIZE = (8.0, 5.0)
DPI = 100
FONT = 10  # axis labels and titles
SMALL = 9  # ticks, legends, annotations: the smallest text on a figure


def figure(ncols: int = 1):
    """A new figure and its axes (a list of `ncols`), with constrained layout so that colour bars and labels of
    neighbouring axes do not overlap. A bare `Figure`, outside pyplot: it needs no display and leaves the
    caller's backend alone (a notebook's inline figures keep working), and Jupyter shows it as an image."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)
    return fig, list(axes[0])


def style(ax, xlabel: str, ylabel: str, title: str = "", legend: bool | None = None, integer: str = "") -> None:
    """Labels, title, tick sizes and a light grid; a legend when the axes have more than one labelled series
    (legend=True: for a single one too, where unlabelled lines around it need it named); integer ticks on the
    axes named in `integer` ("x", "y", "xy"), for iterations and layers, which have no halves."""
    from matplotlib.ticker import MaxNLocator

    for name in integer:
        getattr(ax, f"{name}axis").set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel, fontsize=FONT)
    ax.set_ylabel(ylabel, fontsize=FONT)
    ax.set_title(title, fontsize=FONT)
    ax.tick_params(labelsize=SMALL)
    ax.grid(True, which="both", alpha=0.3)
    _, labels = ax.get_legend_handles_labels()
    if len(labels) > 1 or (legend and labels):
        ax.legend(fontsize=SMALL)
