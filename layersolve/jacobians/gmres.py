"""GMRES with right preconditioning, for exact Newton's system over depth, optionally restarted.

The system is T x = b with (T x)_l = x_l - J_l x_{l-1}: unit lower block-bidiagonal. With a preconditioner P of the
same form (a structured surrogate such as Identity or Mixing), T P^{-1} is the identity plus a nilpotent part of
index <= n, so unrestarted GMRES terminates in at most n inner iterations in exact arithmetic, and in one when
P = T (the surrogate is the exact Jacobian). Each inner iteration is one preconditioner solve (a scan) and one
parallel JVP over all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .._recurrence import LinearMap, Recurrence, Scan, ZeroMap
from ._base import Jacobian, Step, Work, is_count
from .identity import Identity

Tensor = torch.Tensor


@dataclass(frozen=True)
class GMRES:
    """Exact Newton's recurrence solved matrix-free by preconditioned GMRES.

    preconditioner: a structured surrogate P (Identity by default; Mixing for mHC models). The closer P is to
                    the exact Jacobians, the fewer inner iterations.
    restart:        m for restarted GMRES(m): each cycle makes at most m inner iterations, then restarts from the
                    current x. None: no restart.
    tol:            relative residual of the linear solve; None: eps**0.75 of the dtype.
    max_iters:      inner iterations per Newton step, over all cycles; None: the layer count (where unrestarted
                    GMRES terminates).
    """

    preconditioner: Jacobian = field(default_factory=Identity)
    restart: int | None = None
    tol: float | None = None
    max_iters: int | None = None

    def check(self, system, layers: slice, state: Tensor) -> None:
        if not isinstance(self.preconditioner, Jacobian):
            raise TypeError(f"GMRES: preconditioner must be a Jacobian strategy (ls.Identity(), ls.Mixing(), ...), "
                            f"got {self.preconditioner!r}")
        for name in ("restart", "max_iters"):
            value = getattr(self, name)
            if value is not None and not is_count(value):
                raise ValueError(f"GMRES: {name} must be a positive int or None, got {value!r}")
        if self.tol is not None and not (isinstance(self.tol, (int, float)) and self.tol > 0):
            raise ValueError(f"GMRES: tol must be a positive number or None, got {self.tol!r}")
        self.preconditioner.check(system, layers, state)

    def linearize(self, step: Step) -> "KrylovMap":
        tol = self.tol if self.tol is not None else torch.finfo(step.inputs.dtype).eps ** 0.75
        max_iters = self.max_iters if self.max_iters is not None else step.num_layers
        return KrylovMap(step.jvp_map(), self.preconditioner.linearize(step), tol, max_iters, self.restart,
                         step.work)


class KrylovMap(LinearMap):
    """The exact operator, whose recurrence is solved by preconditioned GMRES instead of a sweep. Counts its inner
    iterations in `work`."""

    scannable = False

    def __init__(self, operator: LinearMap, preconditioner: LinearMap, tol: float, max_iters: int,
                 restart: int | None, work: Work):
        self.operator, self.preconditioner = operator, preconditioner
        self.tol, self.max_iters, self.restart, self.work = tol, max_iters, restart, work

    def apply(self, x):
        return self.operator.apply(x)

    def layer(self, i, v):
        return self.operator.layer(i, v)

    def scaled(self, c):
        if c == 0:
            return ZeroMap()
        return KrylovMap(self.operator.scaled(c), self.preconditioner.scaled(c), self.tol, self.max_iters,
                         self.restart, self.work)

    def solve(self, b, recurrence: Recurrence = Scan()):
        def bidiagonal(x: Tensor) -> Tensor:  # (T x)_l = x_l - J_l x_{l-1}, x_0 = 0
            return x - self.operator.apply(torch.cat([torch.zeros_like(x[:1]), x[:-1]]))

        x, inner = gmres(bidiagonal, b, lambda v: self.preconditioner.solve(v, recurrence), self.tol,
                         self.max_iters, self.restart)
        self.work.inner_iterations += inner
        return x


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.vdot(a.detach().flatten(), b.detach().flatten()).real)


def _norm(x: Tensor) -> float:
    return float(torch.linalg.vector_norm(x.detach()))


def gmres(operator: Callable[[Tensor], Tensor], b: Tensor, precondition: Callable[[Tensor], Tensor],
          tol: float, max_iters: int, restart: int | None = None) -> tuple[Tensor, int]:
    """Solve operator(x) = b to relative residual tol, with at most max_iters inner iterations in all, restarting
    from the current x after every `restart` of them (None: never). Returns (x, inner iterations)."""
    target = tol * _norm(b)
    x, residual, total = torch.zeros_like(b), b, 0
    while True:
        budget = max_iters - total if restart is None else min(restart, max_iters - total)
        correction, used, reached = _cycle(operator, residual, precondition, target, budget)
        x, total = x + correction, total + used
        if reached or total >= max_iters:
            return x, total
        residual = b - operator(x)  # the true residual of the restart point, not the cycle's estimate


def _cycle(operator, r: Tensor, precondition, target: float, iters: int) -> tuple[Tensor, int, bool]:
    """One GMRES cycle from the residual r, at most `iters` Arnoldi steps. Returns (correction, steps, reached):
    reached when the residual estimate is within target, or the Krylov space is invariant (the correction is then
    exact for the nonsingular T P^{-1}).

    Arnoldi with modified Gram-Schmidt done twice (re-orthogonalization keeps float32 solves accurate); the small
    Hessenberg least-squares problem is solved in float64 on the CPU."""
    beta = _norm(r)
    if beta <= target:
        return torch.zeros_like(r), 0, True
    basis, directions = [r / beta], []
    hessenberg = torch.zeros(iters + 1, iters, dtype=torch.float64)
    rhs = torch.zeros(iters + 1, dtype=torch.float64)
    rhs[0] = beta
    eps = torch.finfo(r.dtype).eps
    for j in range(iters):
        directions.append(precondition(basis[j]))
        w = operator(directions[-1])
        before = _norm(w)
        for _ in range(2):
            for i, v in enumerate(basis):
                h = _dot(w, v)
                hessenberg[i, j] += h
                w = w - h * v
        norm = _norm(w)
        hessenberg[j + 1, j] = norm
        h_small = hessenberg[: j + 2, : j + 1]
        # gelsd (SVD): the CPU default gelsy made repeated solves differ in the last bit.
        coeffs = torch.linalg.lstsq(h_small, rhs[: j + 2, None], driver="gelsd").solution[:, 0]
        reached = _norm(rhs[: j + 2] - h_small @ coeffs) <= target or norm <= eps * before
        if reached or j + 1 == iters:
            break
        basis.append(w / norm)
    correction = torch.zeros_like(r)
    for c, z in zip(coeffs.tolist(), directions):
        correction = correction + c * z
    return correction, len(directions), reached
