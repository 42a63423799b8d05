"""Schedules: the L layers split into consecutive segments, each run sequentially or solved in parallel with its
own solver and iteration count. The last state of a segment is h_0 of the next (block Gauss-Seidel across
segments, Newton within). SNLP's "sequential prefix + parallel tail of n_par layers" is
Schedule.tail(L, n_par) = [Sequential(L - n_par), Parallel(n_par)].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from ._newton import Newton


@dataclass(frozen=True)
class Sequential:
    """`layers` layers run one after another: exact, depth = layers."""

    layers: int


@dataclass(frozen=True)
class Parallel:
    """`layers` layers solved in parallel. solver / iters / tol of None take the solve call's."""

    layers: int
    solver: "Newton | None" = None
    iters: int | None = None
    tol: float | None = None


Segment = Union[Sequential, Parallel]


@dataclass(frozen=True)
class Schedule:
    segments: tuple[Segment, ...]

    @classmethod
    def tail(cls, num_layers: int, n_par: int, solver: "Newton | None" = None, iters: int | None = None) -> "Schedule":
        """A sequential prefix of num_layers - n_par layers, then a parallel tail of n_par layers."""
        if not 1 <= n_par <= num_layers:
            raise ValueError(f"n_par must be in [1, {num_layers}] (the number of layers), got {n_par}")
        head = (Sequential(num_layers - n_par),) if n_par < num_layers else ()
        return cls(head + (Parallel(n_par, solver, iters),))

    def check(self, num_layers: int) -> None:
        if not self.segments:
            raise ValueError("schedule has no segments")
        for i, seg in enumerate(self.segments):
            if not isinstance(seg, (Sequential, Parallel)):
                raise TypeError(f"schedule.segments[{i}] must be Sequential or Parallel, got {type(seg).__name__}")
            if not isinstance(seg.layers, int) or seg.layers < 1:
                raise ValueError(f"schedule.segments[{i}].layers must be a positive int, got {seg.layers!r}")
        total = sum(seg.layers for seg in self.segments)
        if total != num_layers:
            raise ValueError(f"schedule covers {total} layers, but the system has {num_layers}")

    def slices(self) -> list[tuple[Segment, slice]]:
        out, start = [], 0
        for seg in self.segments:
            out.append((seg, slice(start, start + seg.layers)))
            start += seg.layers
        return out
