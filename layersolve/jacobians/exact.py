"""Exact: J~_l = J_l = df_l/dh at h_{l-1}^k, through torch.func JVPs. Newton over depth, converging quadratically
near the solution. Three ways to solve the Newton step's recurrence x_l = J_l x_{l-1} + b_l:

- "sweep":  forward substitution, one JVP per layer in sequence (depth n per iteration);
- "dense":  materialize every J_l (N x N, N = state size) with N batched JVPs and run the associative matrix
            scan (DEER). Small states only: refused over `memory_budget`;
- "krylov": matrix-free GMRES on the block-bidiagonal system; each inner iteration is one parallel JVP over all
            layers, preconditioned by a structured surrogate (`preconditioner`, Identity by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .._recurrence import LinearMap, MatrixMap, OperatorMap
from ._base import Jacobian, Step
from ._krylov import gmres
from .identity import Identity

METHODS = ("sweep", "dense", "krylov")


def jacobian_bytes(num_layers: int, state: torch.Tensor, copies: int = 1) -> int:
    """Bytes of `copies` sets of num_layers dense N x N Jacobians for states like `state`."""
    return copies * num_layers * state.numel() ** 2 * state.element_size()


def check_budget(who: str, num_layers: int, state: torch.Tensor, budget: int, copies: int) -> None:
    needed = jacobian_bytes(num_layers, state, copies)
    if needed > budget:
        raise MemoryError(
            f"{who} would materialize {num_layers} Jacobians of {state.numel()} x {state.numel()} "
            f"({needed / 2**30:.2f} GiB with its temporaries), over memory_budget={budget / 2**30:.2f} GiB. "
            "Use Exact(method='krylov') (matrix-free, parallel over layers) or Exact(method='sweep'), "
            "Diagonal(probes=k) for a diagonal estimate, or raise memory_budget.")


def jacobians(step: Step) -> torch.Tensor:
    """Every J_l of the step as a dense matrix: (n, N, N), by N batched JVPs (one per basis vector)."""
    n, shape = step.inputs.shape[0], step.inputs.shape[1:]
    size = math.prod(shape)
    basis = torch.eye(size, dtype=step.inputs.dtype, device=step.inputs.device)
    tangents = basis.reshape(size, 1, *shape).expand(size, n, *shape)
    columns = torch.func.vmap(lambda t: step.system.jvp(step.layers, step.inputs, t)[1])(tangents)  # (N, n, *S)
    step.work.jvps += size * n
    step.work.depth += 1
    return columns.reshape(size, n, size).permute(1, 2, 0)  # (n, N_out, N_in)


def jvp_operator(step: Step) -> OperatorMap:
    """The exact J_l as a matrix-free map: all layers by one batched JVP, or one layer by its own JVP."""
    start = step.layers.start

    def one(i: int, v: torch.Tensor) -> torch.Tensor:
        return step.jvp(v[None], slice(start + i, start + i + 1), step.inputs[i:i + 1])[0]

    return OperatorMap(step.jvp, one)


class KrylovMap(LinearMap):
    """The exact operator, solved by preconditioned GMRES instead of a sweep."""

    scannable = False

    def __init__(self, operator: LinearMap, preconditioner: LinearMap, tol: float, max_iters: int):
        self.operator, self.preconditioner, self.tol, self.max_iters = operator, preconditioner, tol, max_iters

    def apply(self, x):
        return self.operator.apply(x)

    def layer(self, i, v):
        return self.operator.layer(i, v)

    def scaled(self, c):
        return KrylovMap(self.operator.scaled(c), self.preconditioner.scaled(c), self.tol, self.max_iters)

    def solve(self, b, method="scan"):
        def bidiagonal(x: torch.Tensor) -> torch.Tensor:  # (T x)_l = x_l - J_l x_{l-1}, x_0 = 0
            return x - self.operator.apply(torch.cat([torch.zeros_like(x[:1]), x[:-1]]))

        x, _ = gmres(bidiagonal, b, lambda v: self.preconditioner.solve(v, method), self.tol, self.max_iters)
        return x


@dataclass(frozen=True)
class Exact(Jacobian):
    """method: "sweep" | "dense" | "krylov". memory_budget: bytes allowed for dense Jacobians.
    preconditioner, krylov_tol (relative; default eps**0.75 of the dtype), krylov_iters (default: the layer
    count, where GMRES terminates): for "krylov"."""

    method: str = "sweep"
    memory_budget: int = 2**30
    preconditioner: Jacobian = field(default_factory=Identity)
    krylov_tol: float | None = None
    krylov_iters: int | None = None

    def check(self, system, layers, state):
        if self.method not in METHODS:
            raise ValueError(f"Exact: method must be one of {METHODS}, got {self.method!r}")
        if self.method == "dense":
            # The Hillis-Steele scan holds the Jacobians, their products and the concatenated result at once.
            check_budget("Exact(method='dense')", layers.stop - layers.start, state, self.memory_budget, copies=3)
        if self.method == "krylov":
            self.preconditioner.check(system, layers, state)

    def linearize(self, step: Step) -> LinearMap:
        if self.method == "dense":
            return MatrixMap(jacobians(step), dim=None)
        operator = jvp_operator(step)
        if self.method == "sweep":
            return operator
        tol = self.krylov_tol if self.krylov_tol is not None else torch.finfo(step.inputs.dtype).eps ** 0.75
        iters = self.krylov_iters if self.krylov_iters is not None else step.num_layers
        return KrylovMap(operator, self.preconditioner.linearize(step), tol, iters)
