"""Exact: J~_l = J_l = df_l/dh at h_{l-1}^k, through torch.func JVPs. Newton over depth, converging quadratically
near the solution. Three ways to solve the Newton step's recurrence x_l = J_l x_{l-1} + b_l, one object each:

- ls.Sweep():  forward substitution, one JVP per layer in sequence (depth n per iteration);
- ls.Dense():  materialize every J_l (N x N, N = state size) with N batched JVPs and run the associative matrix
               scan (DEER). Small states only: refused over its `memory_budget`;
- ls.GMRES():  matrix-free GMRES on the block-bidiagonal system; each inner iteration is one parallel JVP over all
               layers, preconditioned by a structured surrogate (Identity by default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .._recurrence import LinearMap, Sweep
from ._base import Jacobian, Step
from .dense import Dense
from .gmres import GMRES

Method = Union[Sweep, Dense, GMRES]


@dataclass(frozen=True)
class Exact(Jacobian):
    """method: ls.Sweep() (default), ls.Dense(memory_budget=...) or ls.GMRES(preconditioner=..., restart=...,
    tol=..., max_iters=...)."""

    method: Method = field(default_factory=Sweep)

    def check(self, system, layers, state):
        if not isinstance(self.method, (Sweep, Dense, GMRES)):
            raise TypeError(f"Exact: method must be ls.Sweep(), ls.Dense(memory_budget=...) or "
                            f"ls.GMRES(preconditioner=..., restart=..., tol=..., max_iters=...), got {self.method!r}")
        if not isinstance(self.method, Sweep):
            self.method.check(system, layers, state)

    def linearize(self, step: Step) -> LinearMap:
        return step.jvp_map() if isinstance(self.method, Sweep) else self.method.linearize(step)
