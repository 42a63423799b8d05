"""Diagonal: J~_l = diag(J_l), quasi-Newton over depth (quasi-DEER, ELK). The recurrence is an elementwise scan.

- probes=None: the exact diagonal, from N batched JVPs (small states only; refused over `memory_budget`);
- probes=k:    Hutchinson's estimate diag(J) ~ mean over k Rademacher probes z of z * (J z), k JVPs per iteration.
Any surrogate keeps finite termination, so an estimate changes the convergence rate, never the fixed point.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._recurrence import ElementwiseMap
from ._base import Jacobian, Step, is_count
from .dense import check_budget, jacobians


@dataclass(frozen=True)
class Diagonal(Jacobian):
    probes: int | None = None
    memory_budget: int = 2**30

    def check(self, system, layers, state):
        if self.probes is not None and not is_count(self.probes):
            raise ValueError(f"Diagonal: probes must be a positive int or None (exact), got {self.probes!r}")
        if self.probes is None:
            check_budget("Diagonal() (exact)", layers.stop - layers.start, state, self.memory_budget, copies=1)

    def linearize(self, step: Step) -> ElementwiseMap:
        if self.probes is None:
            n, shape = step.inputs.shape[0], step.inputs.shape[1:]
            return ElementwiseMap(jacobians(step).diagonal(dim1=1, dim2=2).reshape(n, *shape))
        estimate = torch.zeros_like(step.inputs)
        for _ in range(self.probes):
            z = torch.randint(0, 2, step.inputs.shape, generator=step.generator, device=step.inputs.device)
            z = z.to(step.inputs.dtype) * 2 - 1
            estimate = estimate + z * step.jvp(z)
        return ElementwiseMap(estimate / self.probes)
