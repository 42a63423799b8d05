"""Zero: J~_l = 0. The update is h_l^{k+1} = f_l(h_{l-1}^k): Jacobi / Picard iteration over layers (Song et al. 2021)."""

from dataclasses import dataclass

from .._recurrence import ZeroMap
from ._base import Jacobian, Step


@dataclass(frozen=True)
class Zero(Jacobian):
    def linearize(self, step: Step) -> ZeroMap:
        return ZeroMap()
