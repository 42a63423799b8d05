"""Initial guesses for the trace of a parallel segment: h_1..h_n from the segment's first state h_start.

SNLP's names: repeat = "h0", one_step = "batch_fwd", given = "warm" (the previous token's trace when decoding).
A guess is any object with `guess(system, layers, h_start, work) -> (n, *S)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .jacobians import Work
from ._system import LayerSystem


@dataclass(frozen=True)
class Repeat:
    """Every h_l = h_start. Free."""

    def guess(self, system: LayerSystem, layers: slice, h_start: torch.Tensor, work: Work) -> torch.Tensor:
        n = layers.stop - layers.start
        return h_start.expand(n, *h_start.shape).clone()


@dataclass(frozen=True)
class OneStep:
    """One Jacobi sweep from repeat: h_l = f_l(h_start) for every l, one parallel evaluation. The first layer is
    then exact."""

    def guess(self, system: LayerSystem, layers: slice, h_start: torch.Tensor, work: Work) -> torch.Tensor:
        n = layers.stop - layers.start
        work.evaluations += n
        work.depth += 1
        return system.evaluate(layers, h_start.expand(n, *h_start.shape))


@dataclass(frozen=True)
class Given:
    """A trace supplied by the caller: (L+1, *S) with row 0 ignored (h_0 is the solve's), or (L, *S)."""

    trace: torch.Tensor

    def check(self, system: LayerSystem, state: torch.Tensor) -> None:
        rows = self.trace.shape[0] if self.trace.ndim else 0
        if self.trace.shape[1:] != state.shape or rows not in (system.num_layers, system.num_layers + 1):
            raise ValueError(f"Given: trace has shape {tuple(self.trace.shape)}, expected "
                             f"({system.num_layers + 1} or {system.num_layers}, *{tuple(state.shape)})")
        if not torch.isfinite(self.trace).all():
            raise ValueError("Given: trace has non-finite values")

    def guess(self, system: LayerSystem, layers: slice, h_start: torch.Tensor, work: Work) -> torch.Tensor:
        offset = self.trace.shape[0] - system.num_layers  # 1 when row 0 is h_0
        return self.trace[layers.start + offset:layers.stop + offset].to(h_start)
