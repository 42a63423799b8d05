"""layersolve: solve the layer trace of a deep network as a nonlinear system, in parallel over depth.

    import layersolve as ls
    system = ls.LayerSystem.from_modules(blocks)
    sol = ls.solve(system, h0, ls.Newton(jacobian=ls.Identity()), iters=4)
    sol.trace, sol.result, sol.stats

See docs/math.md for the mathematics.
"""

from ._diagnostics import Result, Solution, SolveError, Stats
from ._driver import solve
from ._newton import Jacobi, Newton
from ._guesses import Given, Learned, OneStep, Repeat
from ._recurrence import (ElementwiseMap, IdentityMap, LinearMap, MatrixMap, OperatorMap, Scan, Sweep, ZeroMap,
                          associative_scan)
from ._schedule import Parallel, Schedule, Sequential
from ._surrogate import surrogate_error
from ._system import LayerSystem
from .jacobians import GMRES, Dense, Diagonal, Exact, Identity, Jacobian, Mixing, Scaled, Step, Zero

__all__ = [
    "LayerSystem", "solve", "Newton", "Jacobi",
    "Jacobian", "Step", "Zero", "Identity", "Scaled", "Mixing", "Diagonal", "Exact",
    "Scan", "Sweep", "Dense", "GMRES",
    "Repeat", "OneStep", "Given", "Learned",
    "Schedule", "Sequential", "Parallel",
    "Result", "Stats", "Solution", "SolveError", "surrogate_error",
    "LinearMap", "ZeroMap", "IdentityMap", "ElementwiseMap", "MatrixMap", "OperatorMap", "associative_scan",
]
