"""analysis: convergence curves, tables and speed-quality frontiers from layersolve's `Stats` records and the result
JSON that the `snlp` command writes. It computes and draws; it writes no files (the caller saves a returned figure)
and never imports `models`."""

from .convergence import convergence_record, convergence_table, plot_convergence
from .frontier import frontier_points, plot_frontier

__all__ = ["convergence_record", "convergence_table", "plot_convergence", "frontier_points", "plot_frontier"]
