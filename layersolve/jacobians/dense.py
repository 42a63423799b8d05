"""Dense Jacobians: every J_l materialized as an N x N matrix (N = state size) by N batched JVPs. `Dense` is the
DEER way to solve exact Newton's recurrence (an associative matrix scan); `Diagonal()` keeps their diagonals.
Small states only: both are refused over their memory budget before any work."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._recurrence import MatrixMap
from ._base import Step


def jacobian_bytes(num_layers: int, state: torch.Tensor, copies: int = 1) -> int:
    """Bytes of `copies` sets of num_layers dense N x N Jacobians for states like `state`."""
    return copies * num_layers * state.numel() ** 2 * state.element_size()


def check_budget(who: str, num_layers: int, state: torch.Tensor, budget: int, copies: int) -> None:
    needed = jacobian_bytes(num_layers, state, copies)
    if needed > budget:
        raise MemoryError(
            f"{who} would materialize {num_layers} Jacobians of {state.numel()} x {state.numel()} "
            f"({needed / 2**30:.2f} GiB with its temporaries), over memory_budget={budget / 2**30:.2f} GiB. "
            "Use Exact(method=ls.GMRES()) (matrix-free, parallel over layers) or Exact(method=ls.Sweep()), "
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


@dataclass(frozen=True)
class Dense:
    """Exact Newton's recurrence solved with materialized Jacobians and the associative matrix scan (DEER).
    memory_budget: bytes allowed for the Jacobians and the scan's temporaries."""

    memory_budget: int = 2**30

    def check(self, system, layers: slice, state: torch.Tensor) -> None:
        # The Hillis-Steele scan holds the Jacobians, their products and the concatenated result at once.
        check_budget("Exact(method=ls.Dense())", layers.stop - layers.start, state, self.memory_budget, copies=3)

    def linearize(self, step: Step) -> MatrixMap:
        return MatrixMap(jacobians(step), dim=None)
