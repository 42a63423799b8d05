"""Result, Stats and SolveError as data."""

import pytest
import torch

import layersolve as ls
from helpers import random_state, residual_system


def test_results_read_as_messages():
    assert all(isinstance(r.value, str) and len(r.value) > 20 for r in ls.Result)
    assert {r for r in ls.Result if r.ok} == {ls.Result.CONVERGED, ls.Result.COMPLETED, ls.Result.FELL_BACK}
    assert str(ls.Result.DIVERGED).startswith("diverged")


def test_worst_result_is_the_least_usable():
    R = ls.Result
    assert R.worst([R.CONVERGED, R.FELL_BACK, R.COMPLETED]) is R.COMPLETED
    assert R.worst([R.CONVERGED, R.MAX_ITERS, R.DIVERGED]) is R.DIVERGED
    assert R.worst([R.DIVERGED, R.NONFINITE]) is R.NONFINITE
    assert R.worst([R.CONVERGED]) is R.CONVERGED
    # the order ranks every usable result above every unusable one
    assert all(R.worst([good, bad]) is bad for good in R if good.ok for bad in R if not bad.ok)


def test_summary_and_error_carry_the_stats():
    system, h0 = residual_system(5, 3, seed=1), random_state((3,), seed=1)
    sol = ls.solve(system, h0, iters=2, reference=system.sequential(h0))
    text = sol.stats.summary()
    assert "iterations=2" in text and "iterate 2: max residual not evaluated" in text and "max error" in text
    with pytest.raises(ls.SolveError) as info:
        ls.solve(system, h0, iters=1, tol=1e-14)
    assert info.value.result is ls.Result.MAX_ITERS
    assert info.value.stats.iterations == 1
    assert "MAX_ITERS" in str(info.value) and "iterate 1" in str(info.value)
    assert sol.output.shape == h0.shape


def test_a_clone_of_inference_stats_is_ordinary_and_equal():
    """A solve run under inference_mode (as a model's forward runs its layers under no_grad) records inference
    tensors; the clone, made outside, holds ordinary ones, segments included, with the same numbers."""
    system, h0 = residual_system(6, 3, seed=2), random_state((3,), seed=2)
    with torch.inference_mode():
        stats = ls.solve(system, h0, schedule=ls.Schedule((ls.Parallel(3), ls.Parallel(3))), iters=1,
                         reference=system.sequential(h0)).stats
    copy = stats.clone()
    assert len(copy.segments) == 2
    for record, original in ((copy, stats), *zip(copy.segments, stats.segments)):
        for name in ("residual", "error", "exact_prefix", "contraction"):
            tensor = getattr(record, name)
            assert not tensor.is_inference(), name
            torch.testing.assert_close(tensor, getattr(original, name), equal_nan=True, rtol=0, atol=0)
            tensor.add_(0)  # in place, outside inference mode: refused for an inference tensor
