"""What a solve reports: the `Result` of a solve, its `Stats` record, and `SolveError`.

Failure is data: `solve(..., throw=False)` returns a `Solution` whose `result` says what happened; with
`throw=True` (the default) an unsuccessful result raises `SolveError`, which carries the same stats.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import torch


class Result(enum.Enum):
    """How a solve ended. The value is a readable message."""

    CONVERGED = "converged: every layer's relative residual is within tolerance (or K >= layers, which is exact)"
    COMPLETED = "completed the requested iterations; no tolerance was set, so convergence was not checked"
    MAX_ITERS = "reached the iteration limit before every layer's relative residual was within tolerance"
    DIVERGED = ("diverged: the largest absolute residual norm max_l ||h_l - f_l(h_{l-1})|| grew past `divergence` "
                "times the initial guess's")
    NONFINITE = "a layer evaluation or residual became non-finite (inf or nan)"
    FELL_BACK = "diverged, and the remaining layers were finished sequentially: the trace is exact"

    @property
    def ok(self) -> bool:
        """True when the returned trace is usable: converged, completed as asked, or finished sequentially."""
        return self in (Result.CONVERGED, Result.COMPLETED, Result.FELL_BACK)

    def __str__(self) -> str:
        return self.value

    @staticmethod
    def worst(results: Iterable[Result]) -> Result:
        """The most severe of several results (a schedule's segments, an evaluation's batches): non-finite, then
        diverged, max_iters, completed, fell back, converged."""
        return min(results, key=_SEVERITY.index)


_SEVERITY = (Result.NONFINITE, Result.DIVERGED, Result.MAX_ITERS, Result.COMPLETED, Result.FELL_BACK,
             Result.CONVERGED)


@dataclass(frozen=True)
class Stats:
    """One record per solve (per segment, and combined over a schedule).

    Rows are iterates: row k describes the trace after k Newton iterations, row 0 the initial guess.
    Tensors live on the CPU in float64; they are detached from autograd.

    residual:     (iters+1, L) relative residual ||h_l - f_l(h_{l-1})|| / ||f_l(h_{l-1})||. It comes from the
                  evaluations the solve makes anyway, so the last row is NaN unless a tolerance was set or
                  `final_residual=True` paid for one more evaluation.
    error:        (iters+1, L) relative error ||h_l - r_l|| / ||r_l|| against `reference`, or None.
    exact_prefix: (iters+1,) how many leading layers have a residual within `prefix_tol`. Where the last row's
                  residual was not evaluated, it is the count that finite termination guarantees (one more
                  layer than the row before).
    contraction:  (iters, L) secant estimate of ||(J_l - J~_l) u|| / ||u|| along the Newton step u = delta_{l-1}:
                  ||r_l^{k+1}|| / ||delta_{l-1}^k|| (NaN where the step or the next residual is unknown). Below 1,
                  the surrogate's error shrinks the step it propagates.
    iterations:   Newton iterations made (parallel evaluations after the initial guess).
    evaluations:  layer evaluations made (one layer applied to one state counts 1).
    jvps:         layer Jacobian-vector products made (exact and diagonal strategies).
    inner_iterations: GMRES inner iterations (Exact(method=ls.GMRES())), summed over Newton iterations and
                  segments; 0 for the other strategies.
    depth:        evaluation steps on the critical path: a parallel evaluation of any number of layers counts 1,
                  a sequential run of n layers counts n.
    fallback_layers: layers finished sequentially after a divergence (`on_divergence="sequential"`).
    segments:     per-segment records of a scheduled solve, one per segment; empty for a single segment. A
                  segment skipped after a failed one has one unevaluated (NaN) row, exact prefix 0 and no work.
    """

    residual: torch.Tensor
    error: torch.Tensor | None
    exact_prefix: torch.Tensor
    contraction: torch.Tensor
    iterations: int
    evaluations: int
    jvps: int
    inner_iterations: int
    depth: int
    prefix_tol: float
    fallback_layers: int = 0
    segments: tuple["Stats", ...] = field(default=())

    @property
    def num_layers(self) -> int:
        return self.residual.shape[1]

    @staticmethod
    def worst(records: Iterable[Stats]) -> Stats:
        """One record for the same solve of several inputs (an evaluation's batches): per iterate and layer the
        largest residual, error and contraction, the smallest exact prefix, and the largest counts. A solve that
        stopped earlier keeps its last row, as a schedule's finished segment does. Its last row's error is then
        what an evaluation reports as the max over batches of each layer's error."""
        records = list(records)
        if not records or len({s.num_layers for s in records}) > 1:
            raise ValueError("Stats.worst needs at least one record, all over the same number of layers")
        rows = max(s.residual.shape[0] for s in records)

        def largest(name: str, n: int, fill: float | None = None) -> torch.Tensor:  # NaN only where none is known
            return functools.reduce(torch.fmax, [pad_rows(getattr(s, name), n, fill) for s in records])

        prefix = functools.reduce(torch.minimum, [pad_rows(s.exact_prefix[:, None], rows) for s in records])[:, 0]
        return Stats(residual=largest("residual", rows),
                     error=largest("error", rows) if all(s.error is not None for s in records) else None,
                     exact_prefix=prefix, contraction=largest("contraction", rows - 1, math.nan),
                     **{name: max(getattr(s, name) for s in records) for name in _COUNTS},
                     prefix_tol=records[0].prefix_tol)

    def clone(self) -> Stats:
        """The same record over tensors of its own: ordinary tensors where this record's were made under
        `torch.inference_mode` (inference tensors refuse in-place updates outside it)."""
        return replace(self, residual=self.residual.clone(), exact_prefix=self.exact_prefix.clone(),
                       contraction=self.contraction.clone(), error=None if self.error is None else self.error.clone(),
                       segments=tuple(s.clone() for s in self.segments))

    def final_residual(self) -> float:
        """Largest relative residual of the last evaluated iterate."""
        rows = self.residual[~torch.isnan(self.residual).all(dim=1)]
        return float(rows[-1].max()) if len(rows) else float("nan")

    def summary(self) -> str:
        """A few readable lines: counts, and the residual and error per iterate (max over layers)."""
        lines = [
            f"layers={self.num_layers} iterations={self.iterations} evaluations={self.evaluations} "
            f"jvps={self.jvps} inner_iterations={self.inner_iterations} depth={self.depth} "
            f"fallback_layers={self.fallback_layers}"
        ]
        for k in range(self.residual.shape[0]):
            res = self.residual[k]
            text = "not evaluated" if torch.isnan(res).any() else f"{float(res.max()):.3e}"
            line = f"  iterate {k}: max residual {text}, exact prefix {int(self.exact_prefix[k])}"
            if self.error is not None:
                line += f", max error {float(self.error[k].max()):.3e}"
            lines.append(line)
        return "\n".join(lines)


_COUNTS = ("iterations", "evaluations", "jvps", "inner_iterations", "depth", "fallback_layers")


def pad_rows(x: torch.Tensor, rows: int, fill: float | None = None) -> torch.Tensor:
    """Extend to `rows` rows by repeating the last row (a finished solve's state stays), or with `fill`."""
    extra = rows - x.shape[0]
    if extra <= 0:
        return x
    tail = x[-1:].expand(extra, -1) if fill is None else torch.full((extra, x.shape[1]), fill, dtype=x.dtype)
    return torch.cat([x, tail])


class SolveError(RuntimeError):
    """Raised by `solve(..., throw=True)` when the result is not ok. Carries `result` and `stats`."""

    def __init__(self, result: Result, stats: Stats):
        self.result = result
        self.stats = stats
        super().__init__(f"{result.name}: {result.value}\n{stats.summary()}")


@dataclass(frozen=True)
class Solution:
    """What `solve` returns. trace: (L+1, *S), h_0 .. h_L of the last iterate."""

    trace: torch.Tensor
    result: Result
    stats: Stats

    @property
    def output(self) -> torch.Tensor:
        """The last state h_L."""
        return self.trace[-1]
