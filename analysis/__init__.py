"""analysis: convergence curves, tables and plots from layersolve's Stats records, and atomic result writes.

Imports layersolve and matplotlib, never models."""

from .convergence import convergence_record, convergence_table, plot_convergence
from .io import write_atomic, write_json

__all__ = ["convergence_record", "convergence_table", "plot_convergence", "write_atomic", "write_json"]
