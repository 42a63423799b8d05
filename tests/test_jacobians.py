"""Jacobian strategies: exact Newton's three solves (and GMRES's preconditioner and restarts), structured
surrogates that know the model, budgets."""

import pytest
import torch

import layersolve as ls
from helpers import DTYPE, doubly_stochastic, mixing_system, random_state, residual_system


def max_errors(sol):
    return sol.stats.error.max(dim=1).values


class TestExact:
    system = residual_system(16, 6, seed=1, gain=0.3)  # mildly nonlinear, L = 16
    h0 = random_state((2, 6), seed=1)
    reference = system.sequential(h0)

    @pytest.mark.parametrize("method", [ls.Sweep(), ls.Dense(), ls.GMRES()], ids=lambda m: type(m).__name__)
    def test_quadratic_convergence(self, method):
        sol = ls.solve(self.system, self.h0, ls.Newton(jacobian=ls.Exact(method=method)), tol=1e-13,
                       reference=self.reference)
        errors = max_errors(sol)
        assert sol.stats.iterations <= 5  # far fewer than L = 16
        assert errors[-1] <= 1e-10
        # The error roughly squares: e_{k+1} <= 10 e_k^2 once e_k is small, at least two such steps in a row.
        steps = [(a, b) for a, b in zip(errors[:-1], errors[1:]) if 1e-12 < a < 0.2]
        assert len(steps) >= 2
        for a, b in steps:
            assert b <= 10 * a**2

    def test_methods_agree(self):
        traces = [ls.solve(self.system, self.h0, ls.Newton(jacobian=ls.Exact(method=m)), iters=2).trace
                  for m in (ls.Sweep(), ls.Dense(), ls.GMRES())]
        for t in traces[1:]:
            torch.testing.assert_close(t, traces[0], rtol=1e-10, atol=1e-10)

    def test_dense_refuses_over_budget_and_names_alternatives(self):
        big = ls.Exact(method=ls.Dense(memory_budget=1024))
        with pytest.raises(MemoryError, match=r"memory_budget.*method=ls.GMRES\(\).*method=ls.Sweep\(\)"):
            ls.solve(self.system, self.h0, ls.Newton(jacobian=big))

    def test_method_must_be_an_object(self):
        with pytest.raises(TypeError, match=r"Exact: method must be ls.Sweep\(\), ls.Dense\(.*\) or ls.GMRES\(.*got 'krylov'"):
            ls.solve(self.system, self.h0, ls.Newton(jacobian=ls.Exact(method="krylov")))


class TestGMRES:
    """f_l(h) = M_l h on states (S, D): the exact Jacobians are the mixing matrices, so GMRES preconditioned by
    Mixing() solves T x = b in one inner iteration (T P^{-1} = I), and Newton is exact after one iteration. With
    Identity, or no preconditioner (Zero: P = I), T P^{-1} - I is nilpotent of index L: L inner iterations."""

    L = 8
    system = mixing_system(L, 3, 4, seed=6, gain=0.0)
    h0 = random_state((3, 4), seed=6)
    reference = system.sequential(h0)

    def solve(self, iters=None, **gmres):
        solver = ls.Newton(jacobian=ls.Exact(method=ls.GMRES(**gmres)))
        return ls.solve(self.system, self.h0, solver, iters=iters, tol=None if iters else 1e-12,
                        reference=self.reference)

    @pytest.mark.parametrize("preconditioner, inner", [(ls.Mixing(), 1), (ls.Identity(), L), (ls.Zero(), L)],
                             ids=["Mixing", "Identity", "none"])
    def test_preconditioner_sets_the_inner_iterations(self, preconditioner, inner):
        sol = self.solve(preconditioner=preconditioner)
        assert sol.stats.iterations == 1 and sol.stats.inner_iterations == inner
        assert sol.stats.jvps == self.L * inner  # one JVP per layer per inner iteration
        assert sol.stats.error[-1].max() <= 1e-11
        assert f"inner_iterations={inner}" in sol.stats.summary()

    def test_restart_reaches_the_same_solution(self):
        full = self.solve()
        restarted = self.solve(restart=1, max_iters=100)
        torch.testing.assert_close(restarted.trace, full.trace, rtol=1e-10, atol=1e-10)
        # GMRES(1) keeps one direction per cycle, so it needs more inner iterations than unrestarted GMRES's L;
        # each is one JVP sweep, and each restart one more for the true residual.
        stats = restarted.stats
        assert stats.inner_iterations > full.stats.inner_iterations == self.L
        assert stats.jvps == self.L * (2 * stats.inner_iterations - stats.iterations)

    @pytest.mark.parametrize("restart", [None, 1, 2])
    def test_max_iters_caps_the_inner_iterations_of_every_step(self, restart):
        sol = self.solve(iters=2, preconditioner=ls.Identity(), restart=restart, max_iters=3)
        assert sol.stats.inner_iterations == 2 * 3

    def test_counts_add_over_segments(self):
        schedule = ls.Schedule((ls.Parallel(3), ls.Sequential(2), ls.Parallel(3)))
        sol = ls.solve(self.system, self.h0, ls.Newton(jacobian=ls.Exact(method=ls.GMRES())), schedule=schedule)
        counts = [s.inner_iterations for s in sol.stats.segments]
        assert counts[0] > 0 and counts[1] == 0 and counts[2] > 0
        assert sol.stats.inner_iterations == sum(counts)

    def test_bad_settings(self):
        for gmres, error, message in [(ls.GMRES(restart=0), ValueError, "GMRES: restart must be a positive int"),
                                      (ls.GMRES(max_iters=1.5), ValueError, "GMRES: max_iters must be a positive int"),
                                      (ls.GMRES(tol=-1), ValueError, "GMRES: tol must be a positive number"),
                                      (ls.GMRES(preconditioner="mixing"), TypeError, "GMRES: preconditioner must be")]:
            with pytest.raises(error, match=message):
                ls.solve(self.system, self.h0, ls.Newton(jacobian=ls.Exact(method=gmres)))

    def test_mixing_preconditioner_on_a_nonlinear_system(self):
        system, h0 = mixing_system(12, 3, 4, seed=6), random_state((3, 4), seed=6)
        plain = ls.solve(system, h0, ls.Newton(jacobian=ls.Exact()), iters=3)
        mixing, identity = [ls.solve(system, h0, ls.Newton(jacobian=ls.Exact(method=ls.GMRES(preconditioner=p))),
                                     iters=3) for p in (ls.Mixing(), ls.Identity())]
        torch.testing.assert_close(mixing.trace, plain.trace, rtol=1e-9, atol=1e-9)
        assert mixing.stats.inner_iterations < identity.stats.inner_iterations  # M_l is closer to J_l than I


def iterations_to(system, h0, jacobian, tol=1e-8):
    return ls.solve(system, h0, ls.Newton(jacobian=jacobian), tol=tol).stats.iterations


def test_mixing_with_the_true_mixing_beats_identity():
    """f_l(h) = M_l h + g(h) with small g: Mixing(M) is nearly the exact Jacobian, Identity is not."""
    system, h0 = mixing_system(16, 4, 8, seed=2), random_state((4, 8), seed=2)
    assert iterations_to(system, h0, ls.Mixing()) < iterations_to(system, h0, ls.Identity())
    explicit = ls.Mixing(system.mixing, dim=0)
    assert iterations_to(system, h0, explicit) == iterations_to(system, h0, ls.Mixing())


def test_input_dependent_mixing():
    """A system whose mixing matrices depend on the iterate (dynamic mHC) hands them over per linearization."""
    static = mixing_system(6, 3, 4, seed=9)
    calls = []

    def mixing(layers, inputs):
        calls.append(inputs.shape)
        return static.mixing[layers]

    dynamic = ls.LayerSystem(static.evaluate, 6, mixing=mixing, stream_dim=0)
    h0 = random_state((3, 4), seed=9)
    a = ls.solve(dynamic, h0, ls.Newton(jacobian=ls.Mixing()), iters=3).trace
    b = ls.solve(static, h0, ls.Newton(jacobian=ls.Mixing()), iters=3).trace
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert calls == [(6, 3, 4)] * 3


def test_scaled_with_the_true_scales_beats_identity():
    system = residual_system(16, 6, seed=1, gain=0.1, scales=[0.6] * 16)
    h0 = random_state((6,), seed=1)
    assert iterations_to(system, h0, ls.Scaled()) < iterations_to(system, h0, ls.Identity())
    assert iterations_to(system, h0, ls.Scaled(0.6)) == iterations_to(system, h0, ls.Scaled())


class TestDiagonal:
    def test_exact_diagonal_of_an_elementwise_system_is_newton(self):
        """For f_l(h) = tanh(a_l h) the Jacobian is diagonal, so Diagonal() is exact Newton, and Hutchinson is exact
        with one probe (z * z = 1)."""
        a = torch.linspace(0.5, 1.5, 8, dtype=DTYPE)
        system = ls.LayerSystem.from_function(lambda p, h: torch.tanh(p * h), a)
        h0 = random_state((5,), seed=0)
        exact = ls.solve(system, h0, ls.Newton(jacobian=ls.Exact()), iters=3).trace
        for diagonal in (ls.Diagonal(), ls.Diagonal(probes=1)):
            torch.testing.assert_close(ls.solve(system, h0, ls.Newton(jacobian=diagonal), iters=3).trace, exact)

    def test_hutchinson_is_seeded(self):
        system, h0 = residual_system(6, 4, seed=2), random_state((4,), seed=2)
        runs = [ls.solve(system, h0, ls.Newton(jacobian=ls.Diagonal(probes=2)), iters=2, seed=s).trace
                for s in (0, 0, 1)]
        assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])

    def test_bad_probes_and_budget(self):
        system, h0 = residual_system(4, 4, seed=2), random_state((4,), seed=2)
        with pytest.raises(ValueError, match="Diagonal: probes must be a positive int"):
            ls.solve(system, h0, ls.Newton(jacobian=ls.Diagonal(probes=0)))
        with pytest.raises(MemoryError, match="memory_budget"):
            ls.solve(system, h0, ls.Newton(jacobian=ls.Diagonal(memory_budget=16)))


class TestBadStructure:
    system = mixing_system(4, 3, 2, seed=0)
    h0 = random_state((3, 2), seed=0)

    def test_mixing_matrices_of_the_wrong_size(self):
        wrong = doubly_stochastic(4, 2, seed=0)
        with pytest.raises(ValueError, match=r"Mixing: matrices have shape \(4, 2, 2\), expected \(L=4, ..., S=3, S=3\)"):
            ls.solve(self.system, self.h0, ls.Newton(jacobian=ls.Mixing(wrong, dim=0)))
        with pytest.raises(ValueError, match=r"expected \(L=4"):
            ls.solve(self.system, self.h0, ls.Newton(jacobian=ls.Mixing(doubly_stochastic(3, 3, seed=0), dim=0)))

    def test_mixing_without_matrices(self):
        plain = residual_system(4, 2, seed=0)
        with pytest.raises(ValueError, match="Mixing\\(\\) without matrices needs a system that provides mixing"):
            ls.solve(plain, self.h0, ls.Newton(jacobian=ls.Mixing()))

    def test_scaled_of_the_wrong_length(self):
        with pytest.raises(ValueError, match="Scaled: a must be a number or have 4 entries"):
            ls.solve(self.system, self.h0, ls.Newton(jacobian=ls.Scaled([0.5, 0.5])))
        with pytest.raises(ValueError, match=r"Scaled\(\) without a needs a system with scales"):
            ls.solve(self.system, self.h0, ls.Newton(jacobian=ls.Scaled()))

    def test_input_dependent_mixing_of_the_wrong_size(self):
        dynamic = ls.LayerSystem(self.system.evaluate, 4, stream_dim=0,
                                 mixing=lambda layers, inputs: doubly_stochastic(4, 2, seed=0)[layers])
        with pytest.raises(ValueError, match=r"Mixing: matrices have shape \(4, 2, 2\)"):
            ls.solve(dynamic, self.h0, ls.Newton(jacobian=ls.Mixing()))
