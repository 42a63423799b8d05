"""Schedules: segments run sequentially or in parallel, each from the last state of the one before."""

import pytest
import torch

import layersolve as ls
from helpers import random_state, residual_system

system = residual_system(10, 4, seed=3)
h0 = random_state((2, 4), seed=3)
reference = system.sequential(h0)


def test_all_sequential_equals_sequential():
    sol = ls.solve(system, h0, schedule=ls.Schedule((ls.Sequential(10),)))
    assert torch.equal(sol.trace, reference)
    assert (sol.stats.evaluations, sol.stats.depth, sol.stats.iterations) == (10, 10, 0)


@pytest.mark.parametrize("n_par", [1, 4, 10])
def test_fully_iterated_tail_equals_sequential(n_par):
    sol = ls.solve(system, h0, schedule=ls.Schedule.tail(10, n_par), iters=n_par, reference=reference)
    torch.testing.assert_close(sol.trace, reference, rtol=1e-12, atol=1e-12)
    assert sol.result is ls.Result.CONVERGED
    assert sol.stats.depth == (10 - n_par) + n_par  # sequential prefix, then one evaluation per iteration


def test_segments_with_their_own_solvers():
    schedule = ls.Schedule((ls.Parallel(3, ls.Jacobi(), iters=3), ls.Sequential(2),
                            ls.Parallel(5, ls.Newton(jacobian=ls.Exact()), tol=1e-12)))
    sol = ls.solve(system, h0, schedule=schedule, reference=reference)
    torch.testing.assert_close(sol.trace, reference, rtol=1e-10, atol=1e-10)
    assert len(sol.stats.segments) == 3
    assert sol.stats.residual.shape[1] == 10 and sol.stats.error.shape[1] == 10
    assert sol.stats.evaluations == sum(s.evaluations for s in sol.stats.segments)
    assert sol.stats.exact_prefix[-1] == 10


def test_partial_tail_keeps_the_prefix_exact():
    sol = ls.solve(system, h0, schedule=ls.Schedule.tail(10, 6), iters=1, reference=reference)
    assert sol.stats.error[-1, :5].max() <= 1e-12  # 4 sequential layers + 1 exact after one iteration
    assert sol.stats.error[-1, 5:].min() > 1e-8
    assert sol.stats.exact_prefix.tolist() == [4, 5]


def test_the_combined_exact_prefix_stops_at_the_first_inexact_segment():
    """Two parallel segments of 5 at K = 2: each segment's first two layers have zero residual, but the second
    segment starts from an inexact state, so only the first segment's prefix is exact overall."""
    schedule = ls.Schedule((ls.Parallel(5), ls.Parallel(5)))
    sol = ls.solve(system, h0, schedule=schedule, iters=2, final_residual=True, reference=reference)
    assert [s.exact_prefix.tolist() for s in sol.stats.segments] == [[0, 1, 2], [0, 1, 2]]
    assert sol.stats.exact_prefix.tolist() == [0, 1, 2]
    assert sol.stats.error[-1, 5:].min() > 1e-8  # the second segment's "exact" layers are not the model's


def test_bad_schedules():
    with pytest.raises(ValueError, match="schedule covers 9 layers, but the system has 10"):
        ls.solve(system, h0, schedule=ls.Schedule((ls.Sequential(4), ls.Parallel(5))))
    with pytest.raises(ValueError, match=r"n_par must be in \[1, 10\]"):
        ls.Schedule.tail(10, 11)
    with pytest.raises(ValueError, match=r"segments\[0\].layers must be a positive int"):
        ls.solve(system, h0, schedule=ls.Schedule((ls.Sequential(0), ls.Parallel(10))))


def test_a_failed_segment_stops_the_schedule():
    """f_l(h) = -3 h: the Identity surrogate has the wrong sign and IDN diverges. After the diverged segment the
    last one is skipped: NaN states, and a record with no work and nothing exact, so the combined record still
    covers every layer."""
    flipping = ls.LayerSystem(lambda layers, x: -3.0 * x, 30)
    h0 = torch.ones(2, dtype=torch.float64)
    schedule = ls.Schedule((ls.Sequential(3), ls.Parallel(24), ls.Parallel(3)))
    sol = ls.solve(flipping, h0, schedule=schedule, iters=24, throw=False, reference=flipping.sequential(h0))
    assert sol.result is ls.Result.DIVERGED
    assert torch.isnan(sol.trace[28:]).all() and torch.isfinite(sol.trace[:28]).all()
    first, failed, skipped = sol.stats.segments
    assert 0 < failed.iterations < 24
    rows = failed.iterations + 1
    assert sol.stats.residual.shape == sol.stats.error.shape == (rows, 30)
    assert sol.stats.contraction.shape == (rows - 1, 30)
    assert torch.isnan(skipped.residual).all() and skipped.residual.shape == (1, 3)
    assert (skipped.iterations, skipped.evaluations, skipped.depth, skipped.exact_prefix.tolist()) == (0, 0, 0, [0])
    assert (sol.stats.evaluations, sol.stats.depth) == (3 + 24 * rows, 3 + rows)
    assert sol.stats.exact_prefix.tolist() == (3 + failed.exact_prefix).tolist()
    assert failed.exact_prefix[-1] < 24
