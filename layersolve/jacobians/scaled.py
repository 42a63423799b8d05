"""Scaled: J~_l = a_l I, one scalar per layer. The exact skip-path Jacobian of blocks h -> a_l h + g_l(h)
(nanochat's resid_lambdas). The recurrence is a scalar scan."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .._recurrence import ElementwiseMap
from .._system import LayerSystem
from ._base import Jacobian, Step


@dataclass(frozen=True)
class Scaled(Jacobian):
    """a: one number for every layer, a sequence / tensor of L numbers, or None for the system's own `scales`."""

    a: float | Sequence[float] | torch.Tensor | None = None

    def _scales(self, system: LayerSystem) -> torch.Tensor:
        if self.a is None:
            if system.scales is None:
                raise ValueError("Scaled() without a needs a system with scales: pass Scaled(a) or build the system "
                                 "with scales=")
            return system.scales
        a = torch.as_tensor(self.a, dtype=torch.float64)
        return a.expand(system.num_layers) if a.ndim == 0 else a

    def check(self, system, layers, state):
        a = self._scales(system)
        if tuple(a.shape) != (system.num_layers,):
            raise ValueError(f"Scaled: a must be a number or have {system.num_layers} entries (one per layer), "
                             f"got shape {tuple(a.shape)}")
        if not torch.isfinite(a).all():
            raise ValueError("Scaled: a has non-finite entries")

    def linearize(self, step: Step) -> ElementwiseMap:
        return ElementwiseMap(self._scales(step.system)[step.layers].to(step.inputs.device))
