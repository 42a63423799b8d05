"""analysis: tables and figures from what layersolve and `snlp` produce: `ls.Stats` records (convergence per
iteration and per layer, the exact-prefix front), evaluation and benchmark JSON (speed-quality frontiers and their
Pareto fronts; the per-layer update profile; speculative decoding's acceptance and speedup against the draft length), surrogate errors
||J - J~|| per layer, and training logs. The computing is separate from the drawing and tested; plot functions
return a matplotlib Figure and write no files (`models.io.save_figure` does). It never imports `models`: it reads
what models writes."""

from .convergence import (convergence_record, convergence_table, layer_curves, plot_convergence, plot_heatmap,
                          plot_layer_convergence, plot_prefix_front, prefix_front)
from .frontier import FrontierPoint, bench_points, frontier_points, pareto_front, plot_frontier
from .profile import plot_update_profile
from .speculative import SpeculationSeries, plot_speculation, speculation_series
from .surrogate import plot_surrogate_error, surrogate_errors
from .training import TrainingCurves, plot_training, training_curves

__all__ = [
    "convergence_record", "convergence_table", "plot_convergence",
    "layer_curves", "plot_layer_convergence", "plot_heatmap", "prefix_front", "plot_prefix_front",
    "FrontierPoint", "frontier_points", "bench_points", "pareto_front", "plot_frontier",
    "plot_update_profile",
    "SpeculationSeries", "speculation_series", "plot_speculation",
    "surrogate_errors", "plot_surrogate_error",
    "TrainingCurves", "training_curves", "plot_training",
]
