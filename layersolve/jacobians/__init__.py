"""Jacobian strategies: the surrogate J~_l of the Newton update, one file each."""

from ._base import Jacobian, Step, Work
from .diagonal import Diagonal
from .exact import Exact
from .identity import Identity
from .mixing import Mixing
from .scaled import Scaled
from .zero import Zero

__all__ = ["Jacobian", "Step", "Work", "Zero", "Identity", "Scaled", "Mixing", "Diagonal", "Exact"]
