"""GMRES (no restarts) with right preconditioning, for the Newton system over depth.

The system is T x = b with (T x)_l = x_l - J_l x_{l-1}: unit lower block-bidiagonal. With a preconditioner P of the
same form (a structured surrogate such as Identity or Mixing), T P^{-1} is the identity plus a nilpotent part of
index <= n, so GMRES terminates in at most n inner iterations in exact arithmetic, and in few when P is close to T.
"""

from __future__ import annotations

from typing import Callable

import torch

Tensor = torch.Tensor


def _dot(a: Tensor, b: Tensor) -> float:
    return float(torch.vdot(a.flatten(), b.flatten()).real)


def gmres(operator: Callable[[Tensor], Tensor], b: Tensor, precondition: Callable[[Tensor], Tensor],
          tol: float, max_iters: int) -> tuple[Tensor, int]:
    """Solve operator(x) = b to relative residual tol. Returns (x, inner iterations).

    Arnoldi with modified Gram-Schmidt done twice (re-orthogonalization keeps float32 solves accurate); the small
    Hessenberg least-squares problem is solved in float64 on the CPU."""
    beta = float(torch.linalg.vector_norm(b))
    if beta == 0.0:
        return torch.zeros_like(b), 0
    basis, directions = [b / beta], []
    hessenberg = torch.zeros(max_iters + 1, max_iters, dtype=torch.float64)
    rhs = torch.zeros(max_iters + 1, dtype=torch.float64)
    rhs[0] = beta
    coeffs = torch.zeros(0, dtype=torch.float64)
    iters = 0
    for j in range(max_iters):
        iters = j + 1
        z = precondition(basis[j])
        directions.append(z)
        w = operator(z)
        for _ in range(2):
            for i, v in enumerate(basis):
                h = _dot(w, v)
                hessenberg[i, j] += h
                w = w - h * v
        norm = float(torch.linalg.vector_norm(w))
        hessenberg[j + 1, j] = norm
        h_small = hessenberg[: j + 2, : j + 1]
        coeffs = torch.linalg.lstsq(h_small, rhs[: j + 2, None]).solution[:, 0]
        residual = float(torch.linalg.vector_norm(rhs[: j + 2] - h_small @ coeffs))
        if residual <= tol * beta or norm <= 1e-14 * beta:
            break
        basis.append(w / norm)
    x = torch.zeros_like(b)
    for c, z in zip(coeffs.tolist(), directions):
        x = x + c * z
    return x, iters
