"""Jacobian strategies: the surrogate J~_l of the Newton update, one file each; `Exact`'s two non-sweep ways to
solve its recurrence (`Dense`, `GMRES`) in their own files."""

from ._base import Jacobian, Step, Work
from .dense import Dense
from .diagonal import Diagonal
from .exact import Exact
from .gmres import GMRES
from .identity import Identity
from .mixing import Mixing
from .scaled import Scaled
from .zero import Zero

__all__ = ["Jacobian", "Step", "Work", "Zero", "Identity", "Scaled", "Mixing", "Diagonal", "Exact", "Dense", "GMRES"]
