"""The Newton driver: finite termination, closed forms, damping, stats, failure handling, gradients."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import layersolve as ls
from helpers import (DTYPE, INITS, KINDS, all_strategies, make_init, problems, random_state, residual_block,
                     residual_blocks, residual_system, strategies_for)


def layer_errors(trace, reference):
    """Per-layer relative error (L,) of h_1..h_L."""
    diff = (trace[1:] - reference[1:]).flatten(1).norm(dim=1)
    return diff / reference[1:].flatten(1).norm(dim=1)


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=max(1, settings.default.max_examples // 3))  # per kind: every kind is drawn
@given(problems(), st.data())
def test_finite_termination(kind, problem, data):
    """K = L reproduces the sequential trace, and after k iterations the first k layers are exact, for every
    strategy and every initial guess."""
    system, h0 = problem
    jacobian = data.draw(st.sampled_from(strategies_for(system, h0)[kind]), label="jacobian")
    init = make_init(data.draw(st.sampled_from(INITS), label="init"), system, h0, seed=5)
    reference = system.sequential(h0)
    L = system.num_layers
    sol = ls.solve(system, h0, ls.Newton(jacobian=jacobian), iters=L, init=init, reference=reference)
    assert layer_errors(sol.trace, reference).max() <= 1e-10
    assert sol.result is ls.Result.CONVERGED
    k = data.draw(st.integers(0, L - 1), label="k")
    partial = ls.solve(system, h0, ls.Newton(jacobian=jacobian), iters=k, init=init, reference=reference)
    if k:
        assert partial.stats.error[k, :k].max() <= 1e-10
    assert partial.stats.exact_prefix[k] >= k


def jacobi_closed_form(system, trace):
    return torch.cat([trace[:1], system.evaluate(slice(0, system.num_layers), trace[:-1])])


def idn_closed_form(system, trace):
    """h_l^{k+1} = h_0 + sum_{j<=l} (f_j(h_{j-1}^k) - h_{j-1}^k)."""
    branch = system.evaluate(slice(0, system.num_layers), trace[:-1]) - trace[:-1]
    return torch.cat([trace[:1], trace[0] + torch.cumsum(branch, dim=0)])


@pytest.mark.parametrize("jacobian, closed_form", [(ls.Zero(), jacobi_closed_form), (ls.Identity(), idn_closed_form)])
@given(problem=problems(), iters=st.integers(1, 3))
def test_iterates_equal_closed_forms(jacobian, closed_form, problem, iters):
    system, h0 = problem
    init = make_init("given", system, h0, seed=1)
    expected = init.trace.clone()
    expected[0] = h0
    for _ in range(iters):
        expected = closed_form(system, expected)
    sol = ls.solve(system, h0, ls.Newton(jacobian=jacobian), iters=iters, init=init)
    torch.testing.assert_close(sol.trace, expected, rtol=1e-12, atol=1e-12)


@given(problems(), st.data())
def test_damping_limits(problem, data):
    """d = 1 is Jacobi whatever the surrogate; d = 0 is the undamped surrogate; Identity damped by d is
    Scaled(1 - d)."""
    system, h0 = problem
    jacobian = data.draw(st.sampled_from(all_strategies(system, h0)), label="jacobian")
    init = make_init("given", system, h0, seed=2)
    iters = min(2, system.num_layers)

    def run(solver, **kw):
        return ls.solve(system, h0, solver, iters=iters, init=init, **kw).trace

    torch.testing.assert_close(run(ls.Newton(jacobian=jacobian), damping=1.0), run(ls.Jacobi()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(run(ls.Newton(jacobian=jacobian, damping=0.0)), run(ls.Newton(jacobian=jacobian)),
                               rtol=0, atol=0)
    torch.testing.assert_close(run(ls.Newton(jacobian=ls.Identity(), damping=0.25)),
                               run(ls.Newton(jacobian=ls.Scaled(0.75))), rtol=1e-12, atol=1e-12)


def test_recurrence_scan_and_sweep_give_the_same_solve():
    system = residual_system(9, 3, seed=4)
    h0 = random_state((2, 3), seed=4)
    for jacobian in (ls.Identity(), ls.Scaled(), ls.Diagonal()):
        scan = ls.solve(system, h0, ls.Newton(jacobian=jacobian), iters=3).trace
        sweep = ls.solve(system, h0, ls.Newton(jacobian=jacobian, recurrence=ls.Sweep()), iters=3).trace
        torch.testing.assert_close(scan, sweep, rtol=1e-12, atol=1e-12)


class TestStats:
    system = residual_system(6, 3, seed=11)
    h0 = random_state((3,), seed=11)

    def test_residual_is_zero_on_the_exact_prefix(self):
        sol = ls.solve(self.system, self.h0, iters=4, final_residual=True)
        for k in range(5):
            assert (sol.stats.residual[k, :k] <= 1e-13).all()
            assert (sol.stats.residual[k, k:] > 1e-8).all()  # the rest is not yet exact
        assert sol.stats.exact_prefix.tolist() == [0, 1, 2, 3, 4]

    def test_last_row_is_free_unless_asked_for(self):
        lean = ls.solve(self.system, self.h0, iters=3)
        assert torch.isnan(lean.stats.residual[3]).all()
        assert lean.stats.exact_prefix[3] == 3  # guaranteed by finite termination
        paid = ls.solve(self.system, self.h0, iters=3, final_residual=True)
        assert torch.isfinite(paid.stats.residual[3]).all()
        assert paid.stats.evaluations == lean.stats.evaluations + 6

    @pytest.mark.parametrize("init, extra", [(ls.Repeat(), 0), (ls.OneStep(), 1)])
    def test_counts(self, init, extra):
        L, K = 6, 3
        sol = ls.solve(self.system, self.h0, iters=K, init=init)
        assert (sol.stats.iterations, sol.stats.evaluations, sol.stats.depth, sol.stats.jvps,
                sol.stats.inner_iterations) == (K, (K + extra) * L, K + extra, 0, 0)
        probes = ls.solve(self.system, self.h0, ls.Newton(jacobian=ls.Diagonal(probes=2)), iters=K)
        assert probes.stats.jvps == 2 * L * K

    def test_errors(self):
        reference = self.system.sequential(self.h0)
        sol = ls.solve(self.system, self.h0, iters=6, reference=reference)
        assert sol.stats.error.shape == (7, 6) and sol.stats.error[-1].max() <= 1e-12

    def test_contraction_is_the_secant_estimate(self):
        """For f_l(h) = A_l h + c_l and J~ = I, the residual after a step u = h^{k+1} - h^k is
        r_l^{k+1} = (I - A_l) u_{l-1}, so the estimate is exactly ||(A_l - I) u_{l-1}|| / ||u_{l-1}||."""
        L, K = 6, 4
        g = torch.Generator().manual_seed(5)
        params = {"a": torch.randn(L, 3, 3, generator=g, dtype=DTYPE) / 3, "c": torch.randn(L, 3, generator=g, dtype=DTYPE)}
        system = ls.LayerSystem.from_function(lambda p, h: p["a"] @ h + p["c"], params)
        h0 = random_state((3,), seed=5)
        sol = ls.solve(system, h0, iters=K, final_residual=True)
        traces = [ls.solve(system, h0, iters=k).trace for k in range(K + 1)]
        for k in range(K):
            u = (traces[k + 1] - traces[k])[1:-1]  # u_{l-1} for l = 2..L; layer 1's input never moves
            expected = torch.linalg.vector_norm(((params["a"][1:] - torch.eye(3, dtype=DTYPE)) @ u[..., None])[..., 0],
                                                dim=1) / torch.linalg.vector_norm(u, dim=1)
            moving = torch.linalg.vector_norm(u, dim=1) > 1e-6  # past the exact prefix, where u is rounding
            assert moving.sum() == L - 1 - k
            torch.testing.assert_close(sol.stats.contraction[k, 1:][moving], expected[moving], rtol=1e-9, atol=0)
            assert torch.isnan(sol.stats.contraction[k, 0])

    def test_iterations_capped_at_layers(self):
        sol = ls.solve(self.system, self.h0, iters=50)
        assert sol.stats.iterations == 6 and sol.result is ls.Result.CONVERGED


def test_tolerance_stops_early_and_max_iters_reports():
    system = residual_system(16, 4, seed=3, gain=0.1)
    h0 = random_state((4,), seed=3)
    sol = ls.solve(system, h0, tol=1e-6)
    assert sol.result is ls.Result.CONVERGED and sol.stats.iterations < 16
    assert sol.stats.final_residual() <= 1e-6
    capped = ls.solve(system, h0, tol=1e-14, iters=2, throw=False)
    assert capped.result is ls.Result.MAX_ITERS
    with pytest.raises(ls.SolveError, match="MAX_ITERS"):
        ls.solve(system, h0, tol=1e-14, iters=2)
    assert ls.solve(system, h0, iters=2).result is ls.Result.COMPLETED


class TestBadInput:
    system = residual_system(4, 3, seed=0)
    h0 = random_state((3,), seed=0)

    def test_non_finite_h0(self):
        h0 = self.h0.clone()
        h0[1] = math.nan
        with pytest.raises(ValueError, match="h0 has 1 non-finite"):
            ls.solve(self.system, h0)

    def test_shape_mismatch(self):
        with pytest.raises(ValueError, match=r"states of shape \(5,\).*does the state fit"):
            ls.solve(self.system, random_state((5,), seed=0))
        declared = ls.LayerSystem(self.system.evaluate, 4, state_shape=(None, 3))
        with pytest.raises(ValueError, match=r"h0 has shape \(3,\), but the system expects states of shape \(\*, 3\)"):
            ls.solve(declared, self.h0)

    def test_dtype_mismatch(self):
        with pytest.raises(TypeError, match="h0 has dtype torch.float32, but the system computes in torch.float64"):
            ls.solve(self.system, self.h0.float())

    def test_negative_iters(self):
        with pytest.raises(ValueError, match="iters must be a non-negative int"):
            ls.solve(self.system, self.h0, iters=-1)

    @pytest.mark.parametrize("damping", [-0.1, 1.5, math.nan])
    def test_damping_outside_unit_interval(self, damping):
        with pytest.raises(ValueError, match=r"damping must be a number in \[0, 1\]"):
            ls.solve(self.system, self.h0, damping=damping)

    def test_other_arguments(self):
        with pytest.raises(ValueError, match="tol must be a positive number"):
            ls.solve(self.system, self.h0, tol=0)
        with pytest.raises(ValueError, match="on_divergence must be one of"):
            ls.solve(self.system, self.h0, on_divergence="ignore")
        with pytest.raises(ValueError, match=r"reference must be a trace of shape \(5, 3\)"):
            ls.solve(self.system, self.h0, reference=self.h0)

    def test_strings_where_objects_are_expected(self):
        with pytest.raises(TypeError, match=r"Newton.recurrence must be ls.Scan\(\) .* or ls.Sweep\(\) .* got 'sweep'"):
            ls.solve(self.system, self.h0, ls.Newton(recurrence="sweep"))
        with pytest.raises(TypeError, match=r"recurrence must be ls.Scan\(\)"):
            ls.IdentityMap().solve(self.h0[None], "scan")

    def test_jacobi_is_a_solver_not_a_strategy(self):
        with pytest.raises(TypeError, match=r"pass it as the solver.*or use jacobian=ls.Zero\(\)"):
            ls.solve(self.system, self.h0, ls.Newton(jacobian=ls.Jacobi()))
        with pytest.raises(TypeError, match=r"schedule.segments\[0\].solver must be ls.Newton"):
            ls.solve(self.system, self.h0, schedule=ls.Schedule((ls.Parallel(4, ls.Identity()),)))


def flipping_system(num_layers=24, blowup=1e12):
    """f_l(h) = -3 h: the true Jacobian is -3 I, so Identity's correction has the wrong sign and IDN diverges.
    Past |h| > blowup the layer returns inf, standing in for an overflow."""
    def evaluate(layers, inputs):
        out = -3.0 * inputs
        return torch.where(inputs.abs() > blowup, torch.full_like(out, math.inf), out)
    return ls.LayerSystem(evaluate, num_layers)


class TestDivergence:
    h0 = torch.linspace(-1, 1, 4, dtype=torch.float64)

    def test_detected_within_one_iteration_of_onset(self):
        system = flipping_system(blowup=math.inf)

        def worst_residual(k):  # max_l ||h_l - f_l(h_{l-1})|| of the k-th IDN iterate, computed here
            trace = ls.solve(system, self.h0, ls.Newton(divergence=None), iters=k).trace
            return float((trace[1:] - system.evaluate(slice(0, 24), trace[:-1])).flatten(1).norm(dim=1).max())

        history = [worst_residual(k) for k in range(25)]
        onset = next(k for k, r in enumerate(history) if r > 1e6 * history[0])
        assert onset > 0
        sol = ls.solve(system, self.h0, iters=24, throw=False)
        assert sol.result is ls.Result.DIVERGED
        assert sol.stats.iterations == onset
        with pytest.raises(ls.SolveError, match="DIVERGED") as info:
            ls.solve(system, self.h0, iters=24)
        assert info.value.result is ls.Result.DIVERGED and info.value.stats.iterations == onset

    def test_the_criterion_is_absolute(self):
        """Jacobi on f_l(h) = 2 h from a repeat guess: after k iterations h_l = 2^min(l, k) h_0, so the residual of
        every layer past k is -2^k h_0: its relative size stays 1/2 while its norm doubles per iteration. With
        divergence=100 the solve is DIVERGED when 2^k first exceeds 100, at k = 7."""
        system = ls.LayerSystem(lambda layers, x: 2.0 * x, 12)
        sol = ls.solve(system, self.h0, ls.Newton(jacobian=ls.Zero(), divergence=100.0), iters=12, throw=False)
        assert sol.result is ls.Result.DIVERGED and sol.stats.iterations == 7
        relative = sol.stats.residual[torch.arange(8)[:, None] < torch.arange(1, 13)]  # layers past the prefix
        torch.testing.assert_close(relative, torch.full_like(relative, 0.5), rtol=1e-15, atol=0)

    def test_non_finite_is_reported(self):
        sol = ls.solve(flipping_system(), self.h0, ls.Newton(divergence=None), iters=20, tol=1e-9, throw=False)
        assert sol.result is ls.Result.NONFINITE

    @pytest.mark.parametrize("blowup", [math.inf, 1e12])
    def test_sequential_fallback_is_exact(self, blowup):
        system = flipping_system(blowup=blowup)
        sol = ls.solve(system, self.h0, iters=20, on_divergence="sequential")
        assert sol.result is ls.Result.FELL_BACK and sol.result.ok
        assert 0 < sol.stats.fallback_layers < system.num_layers
        torch.testing.assert_close(sol.trace, system.sequential(self.h0), rtol=1e-12, atol=0)


def test_gradcheck_through_two_idn_iterations():
    p = residual_blocks(3, 2, seed=8, gain=0.5)
    h0 = random_state((2,), seed=8).requires_grad_()
    w = p["w"].clone().requires_grad_()

    def trace(h0, w):
        system = ls.LayerSystem.from_function(residual_block, {**p, "w": w})
        return ls.solve(system, h0, iters=2).trace

    assert torch.autograd.gradcheck(trace, (h0, w))
