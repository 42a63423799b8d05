"""The one Newton driver over depth (docs/math.md).

Each iteration evaluates every layer of a segment at the current iterate in one parallel call,
F_l = f_l(h_{l-1}^k), then solves the surrogate's linear recurrence for the change of the trace:

    delta_l = J~_l delta_{l-1} + (F_l - h_l^k),   delta_0 = 0,   h^{k+1} = h^k + delta,

which is h_l^{k+1} = f_l(h_{l-1}^k) + J~_l (h_{l-1}^{k+1} - h_{l-1}^k) written in increments (better rounding).
Whatever J~ is, after k iterations the first k layers are exact (finite termination), so iterations are capped at
the segment's layer count. The surrogate's map takes the whole step (`LinearMap.correct`: residual, solve, new trace,
step norms), fused into one Triton kernel where it can be, and the residual norms come from one pass over F and h
(layersolve.kernels); the driver never branches on either.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from . import kernels
from ._diagnostics import Result, Solution, SolveError, Stats, pad_rows
from ._guesses import Given, Repeat
from ._newton import Newton
from ._recurrence import layer_norms
from ._schedule import Parallel, Schedule, Sequential
from ._system import LayerSystem, machine_tolerance
from .jacobians import Step, Work

Tensor = torch.Tensor
ON_DIVERGENCE = ("stop", "sequential")


def solve(system: LayerSystem, h0: Tensor, solver: Newton | None = None, *, iters: int | None = None,
          tol: float | None = None, init=None, schedule: Schedule | None = None, damping: float | None = None,
          reference: Tensor | None = None, on_divergence: str = "stop", throw: bool = True,
          final_residual: bool = False, seed: int = 0) -> Solution:
    """Solve the layer trace of `system` from h0.

    solver:         Newton(...) (default: Identity, i.e. IDN).
    iters / tol:    iterations per parallel segment, and / or a relative-residual tolerance. With neither, every
                    segment runs to exactness (as many iterations as it has layers).
    init:           Repeat() (default), OneStep(), Given(trace), or any object with the same `guess` method.
    schedule:       segments of the L layers; default one parallel segment.
    damping:        replaces solver.damping.
    reference:      a trace (L+1, *S) to measure the error against per iterate (Stats.error).
    on_divergence:  "stop" (report DIVERGED / NONFINITE) or "sequential" (finish the rest exactly).
    throw:          raise SolveError when the result is not ok; otherwise return it.
    final_residual: pay one more evaluation to know the last iterate's residual when no tol asks for it.
    seed:           seeds the probes of randomized strategies.
    """
    solver = solver if solver is not None else Newton()
    if damping is not None:
        solver = dataclasses.replace(solver, damping=damping)
    init = init if init is not None else Repeat()
    schedule = schedule if schedule is not None else Schedule((Parallel(system.num_layers),))
    _check_arguments(system, h0, solver, iters, tol, init, schedule, reference, on_divergence)

    generator = torch.Generator(device=h0.device).manual_seed(seed)
    pieces, records, results = [h0[None]], [], []
    for seg, layers in schedule.slices():
        start = pieces[-1][-1]
        ref = None if reference is None else reference[layers.start:layers.stop + 1]
        if results and not results[-1].ok:  # a failed segment leaves nothing to start from
            pieces.append(torch.full((seg.layers, *h0.shape), math.nan, dtype=h0.dtype, device=h0.device))
            records.append(_skipped(seg.layers, ref, machine_tolerance(h0.dtype)))
            continue
        if isinstance(seg, Sequential):
            trace, result, stats = _sequential(system, layers, start, ref)
        else:
            trace, result, stats = _parallel(
                system, layers, start, seg.solver or solver,
                seg.iters if seg.iters is not None else iters, seg.tol if seg.tol is not None else tol,
                init, ref, on_divergence, final_residual, generator)
        pieces.append(trace[1:])
        records.append(stats)
        results.append(result)

    stats = records[0] if len(records) == 1 else _combine(records)
    result = Result.worst(results)
    solution = Solution(torch.cat(pieces), result, stats)
    if throw and not result.ok:
        raise SolveError(result, stats)
    return solution


def _check_arguments(system, h0, solver, iters, tol, init, schedule, reference, on_divergence) -> None:
    if not isinstance(system, LayerSystem):
        raise TypeError(f"system must be a LayerSystem, got {type(system).__name__}")
    system.check_state(h0, "h0")
    _check_solver(solver, "solver")
    if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 0):
        raise ValueError(f"iters must be a non-negative int or None, got {iters!r}")
    if tol is not None and not (isinstance(tol, (int, float)) and tol > 0):
        raise ValueError(f"tol must be a positive number or None, got {tol!r}")
    if on_divergence not in ON_DIVERGENCE:
        raise ValueError(f"on_divergence must be one of {ON_DIVERGENCE}, got {on_divergence!r}")
    if not hasattr(init, "guess"):
        raise TypeError(f"init must be Repeat(), OneStep(), Given(trace) or have a guess method, got {init!r}")
    if isinstance(init, Given):
        init.check(system, h0)
    if reference is not None:
        expected = (system.num_layers + 1, *h0.shape)
        if not isinstance(reference, Tensor) or tuple(reference.shape) != expected:
            got = tuple(reference.shape) if isinstance(reference, Tensor) else type(reference).__name__
            raise ValueError(f"reference must be a trace of shape {expected}, got {got}")
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a Schedule, got {type(schedule).__name__}")
    schedule.check(system.num_layers)
    for i, (seg, layers) in enumerate(schedule.slices()):
        if isinstance(seg, Parallel):
            seg_solver = seg.solver or solver
            _check_solver(seg_solver, f"schedule.segments[{i}].solver")
            seg_solver.jacobian.check(system, layers, h0)


def _check_solver(solver, name: str) -> None:
    if not isinstance(solver, Newton):
        raise TypeError(f"{name} must be ls.Newton(...) (or ls.Jacobi()), got {solver!r}")
    solver.check()


def _relative(diff: Tensor, base: Tensor) -> Tensor:
    return layer_norms(diff) / layer_norms(base).clamp_min(torch.finfo(torch.float64).tiny)


def _residual_norms(trace: Tensor, outputs: Tensor) -> tuple[Tensor, Tensor]:
    """(||F_l - h_l||, ||F_l||) per layer, float64 and detached: one fused kernel where kernels.use_triton says so
    (detached, so a solve under autograd still gets it)."""
    trace, outputs = trace.detach(), outputs.detach()
    if kernels.use_triton(trace, outputs):
        return kernels.residual_norms(trace, outputs)
    return layer_norms(outputs - trace[1:]), layer_norms(outputs)


def _sequential(system: LayerSystem, layers: slice, start: Tensor, reference: Tensor | None):
    n = layers.stop - layers.start
    trace = system.sequential(start, layers.start, layers.stop)
    work = Work(evaluations=n, depth=n)
    error = None if reference is None else _relative(trace[1:] - reference[1:], reference[1:])[None]
    residual = torch.zeros(1, n, dtype=torch.float64)  # exact by construction
    return trace, Result.CONVERGED, _stats(residual, error, [], work, machine_tolerance(start.dtype), 0)


def _skipped(n: int, reference: Tensor | None, prefix_tol: float) -> Stats:
    """The record of a segment not run (after a failed one): one unevaluated row, nothing exact, no work."""
    unknown = torch.full((1, n), math.nan, dtype=torch.float64)
    return _stats(unknown, None if reference is None else unknown, [], Work(), prefix_tol, 0)


def _parallel(system, layers, start, solver, iters, tol, init, reference, on_divergence, final_residual, generator):
    n = layers.stop - layers.start
    iters = n if iters is None and tol is None else min(n if iters is None else iters, n)
    prefix_tol = machine_tolerance(start.dtype)
    work = Work()
    trace = torch.cat([start[None], init.guess(system, layers, start, work)])  # (n+1, *S)
    residuals, errors, contraction = [], [], []
    checked = solver.divergence is not None or tol is not None
    bound, step_norms, result = math.inf, None, None
    for k in range(iters + 1):
        if reference is not None:
            errors.append(_relative(trace[1:] - reference[1:], reference[1:]))
        if k == iters and tol is None and not final_residual:
            residuals.append(torch.full((n,), math.nan, dtype=torch.float64))
            break
        outputs = system.evaluate(layers, trace[:-1])  # F_l = f_l(h_{l-1}^k), all layers at once
        work.evaluations += n
        work.depth += 1
        residual_norms, output_norms = _residual_norms(trace, outputs)
        residuals.append(residual_norms / output_norms.clamp_min(torch.finfo(torch.float64).tiny))
        if step_norms is not None:  # ||r_l^{k+1}|| / ||delta_{l-1}^k||; layer 1's input never moves
            moved = torch.cat([torch.zeros(1, dtype=torch.float64, device=step_norms.device), step_norms[:-1]])
            contraction.append(torch.where(moved > 0, residual_norms / moved, math.nan))
        if checked:
            worst, largest = float(residual_norms.max()), float(residuals[-1].max())
            if k == 0 and solver.divergence is not None:
                floor = prefix_tol * float(output_norms.max())
                bound = solver.divergence * max(worst, floor, torch.finfo(torch.float64).tiny)
            if not (math.isfinite(worst) and math.isfinite(largest)):
                result = Result.NONFINITE
            elif worst > bound:
                result = Result.DIVERGED
            elif tol is not None and largest <= tol:
                result = Result.CONVERGED
            if result is not None:
                break
        if k == iters:
            break
        surrogate = solver.jacobian.linearize(Step(system, layers, trace[:-1], outputs, work, generator))
        if solver.damping:  # undamped, each map keeps its own fastest solve (IDN: a cumsum)
            surrogate = surrogate.scaled(1.0 - solver.damping)
        trace, step_norms = surrogate.correct(trace, outputs, solver.recurrence)  # the step, and ||delta_l||

    iterations = len(residuals) - 1
    if result is None:
        if not checked and not torch.isfinite(trace).all():
            result = Result.NONFINITE
        elif tol is not None:
            result = Result.MAX_ITERS
        else:  # exact by finite termination, or measured exact
            exact = iters == n or _leading(residuals[-1].tolist(), prefix_tol) == n
            result = Result.CONVERGED if exact else Result.COMPLETED
    fallback = 0
    if result in (Result.DIVERGED, Result.NONFINITE) and on_divergence == "sequential":
        exact = _leading(residuals[-1].tolist(), prefix_tol) if not torch.isnan(residuals[-1]).all() else 0
        tail = system.sequential(trace[exact], layers.start + exact, layers.stop)
        trace = torch.cat([trace[:exact + 1], tail[1:]])
        fallback = n - exact
        work.evaluations += fallback
        work.depth += fallback
        result = Result.FELL_BACK
    residual = torch.stack(residuals).cpu()
    error = torch.stack(errors).cpu() if errors else None
    stats = _stats(residual, error, [c.cpu() for c in contraction], work, prefix_tol, fallback, iterations)
    return trace, result, stats


def _leading(row: list[float], threshold: float) -> int:
    """How many leading entries of a residual row are within the threshold (NaN is not)."""
    return next((i for i, r in enumerate(row) if not r <= threshold), len(row))


def _exact_prefix(residual: Tensor, threshold: float) -> Tensor:
    """Per row, the leading layers within threshold; an unevaluated (NaN) row gets what finite termination
    guarantees: one more layer than the row before. In Python over the few rows: a solve per decoding step builds
    this, and tensor ops on rows of a few numbers cost more than the numbers."""
    n, prefix = residual.shape[1], []
    for row in residual.tolist():
        if all(math.isnan(r) for r in row):
            prefix.append(min(n, prefix[-1] + 1) if prefix else 0)
        else:
            prefix.append(_leading(row, threshold))
    return torch.tensor(prefix)


def _stats(residual, error, contraction, work, prefix_tol, fallback, iterations=0) -> Stats:
    n = residual.shape[1]
    rows = torch.stack(contraction) if contraction else torch.zeros(0, n, dtype=torch.float64)
    rows = torch.cat([rows, torch.full((iterations - rows.shape[0], n), math.nan, dtype=torch.float64)])
    return Stats(residual=residual, error=error, exact_prefix=_exact_prefix(residual, prefix_tol), contraction=rows,
                 iterations=iterations, evaluations=work.evaluations, jvps=work.jvps,
                 inner_iterations=work.inner_iterations, depth=work.depth, prefix_tol=prefix_tol,
                 fallback_layers=fallback)


def _combine(records: list[Stats]) -> Stats:
    """One record over all layers of a schedule. Row k is every segment after its k-th iteration (a segment that
    finished earlier keeps its last row)."""
    rows = max(s.residual.shape[0] for s in records)
    residual = torch.cat([pad_rows(s.residual, rows) for s in records], dim=1)
    error = None
    if all(s.error is not None for s in records):
        error = torch.cat([pad_rows(s.error, rows) for s in records], dim=1)
    contraction = torch.cat([pad_rows(s.contraction, rows - 1, math.nan) for s in records], dim=1)
    prefix = []
    for k in range(rows):
        total = 0
        for s in records:
            p = int(s.exact_prefix[min(k, len(s.exact_prefix) - 1)])
            total += p
            if p < s.num_layers:
                break
        prefix.append(total)
    return Stats(residual=residual, error=error, exact_prefix=torch.tensor(prefix), contraction=contraction,
                 iterations=sum(s.iterations for s in records), evaluations=sum(s.evaluations for s in records),
                 jvps=sum(s.jvps for s in records), inner_iterations=sum(s.inner_iterations for s in records),
                 depth=sum(s.depth for s in records),
                 prefix_tol=records[0].prefix_tol, fallback_layers=sum(s.fallback_layers for s in records),
                 segments=tuple(records))
