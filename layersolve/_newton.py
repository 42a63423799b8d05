"""The solver's hyperparameters: `Newton` (a surrogate Jacobian strategy and how to use it) and the `Jacobi`
alias. The driver loop that runs them is `_driver.solve`."""

from __future__ import annotations

from dataclasses import dataclass, field

from ._recurrence import Recurrence, Scan, check_recurrence
from .jacobians import Identity, Jacobian, Zero


@dataclass(frozen=True)
class Newton:
    """The solver: a surrogate Jacobian strategy and how to use it.

    jacobian:   the strategy (Zero, Identity, Scaled, Mixing, Diagonal, Exact).
    damping:    d in [0, 1]; the surrogate is multiplied by 1 - d (d = 1 is Jacobi; ELK-style trust region).
    recurrence: how the surrogate's recurrence is solved: ls.Scan() (associative scan, log depth) or ls.Sweep()
                (forward substitution, depth n). Matrix-free surrogates always sweep.
    divergence: a solve has diverged when the largest absolute residual norm max_l ||h_l - f_l(h_{l-1})|| grows
                past divergence times that of the initial guess (floored at sqrt(eps) times the largest layer
                output, so an exact guess does not make rounding look like growth). Absolute norms, because a
                relative residual stays bounded when the iterate and its evaluation blow up together. None turns
                the per-iteration checks off (no host sync per iteration); a non-finite trace is still reported.
    """

    jacobian: Jacobian = field(default_factory=Identity)
    damping: float = 0.0
    recurrence: Recurrence = field(default_factory=Scan)
    divergence: float | None = 1e6

    def check(self) -> None:
        if isinstance(self.jacobian, Newton):
            raise TypeError("Newton.jacobian got a solver (ls.Jacobi() is Newton(jacobian=ls.Zero())): pass it as "
                            "the solver, solve(system, h0, ls.Jacobi()), or use jacobian=ls.Zero()")
        if not isinstance(self.jacobian, Jacobian):
            raise TypeError(f"Newton.jacobian must be a Jacobian strategy (ls.Identity(), ...), got {self.jacobian!r}")
        if not (isinstance(self.damping, (int, float)) and 0.0 <= self.damping <= 1.0):
            raise ValueError(f"damping must be a number in [0, 1], got {self.damping!r}")
        check_recurrence(self.recurrence, "Newton.recurrence")
        if self.divergence is not None and not self.divergence > 0:
            raise ValueError(f"divergence must be positive or None, got {self.divergence!r}")


def Jacobi(divergence: float | None = 1e6) -> Newton:
    """The readable alias of Newton(jacobian=Zero()): h_l^{k+1} = f_l(h_{l-1}^k)."""
    return Newton(jacobian=Zero(), divergence=divergence)
