"""Jacobian strategies: exact Newton's three solves, structured surrogates that know the model, budgets."""

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

    @pytest.mark.parametrize("method", ["sweep", "dense", "krylov"])
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
                  for m in ("sweep", "dense", "krylov")]
        for t in traces[1:]:
            torch.testing.assert_close(t, traces[0], rtol=1e-10, atol=1e-10)

    def test_krylov_with_mixing_preconditioner(self):
        system, h0 = mixing_system(12, 3, 4, seed=6), random_state((3, 4), seed=6)
        plain = ls.solve(system, h0, ls.Newton(jacobian=ls.Exact(method="sweep")), iters=3).trace
        pre = ls.solve(system, h0, ls.Newton(jacobian=ls.Exact(method="krylov", preconditioner=ls.Mixing())),
                       iters=3).trace
        torch.testing.assert_close(pre, plain, rtol=1e-9, atol=1e-9)

    def test_dense_refuses_over_budget_and_names_alternatives(self):
        big = ls.Exact(method="dense", memory_budget=1024)
        with pytest.raises(MemoryError, match=r"memory_budget.*method='krylov'.*method='sweep'"):
            ls.solve(self.system, self.h0, ls.Newton(jacobian=big))

    def test_unknown_method(self):
        with pytest.raises(ValueError, match="Exact: method must be one of"):
            ls.solve(self.system, self.h0, ls.Newton(jacobian=ls.Exact(method="lu")))


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
