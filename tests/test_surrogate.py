"""ls.surrogate_error: the power-iteration estimate of ||J_l - J~_l||_2 against dense matrix norms, on linear systems
(where J_l = A_l anywhere) and on nonlinear ones (where it must be the Jacobian at h_{l-1}, the layer's own input),
for a slice of layers, relative to ||J_l||, batched over layers, and the refusals."""

import pytest
import torch
from hypothesis import given, strategies as st

import layersolve as ls
from helpers import DTYPE, doubly_stochastic, problems, random_state, residual_system

L, N = 6, 4
EYE = torch.eye(N, dtype=DTYPE)


def spectral(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.matrix_norm(m, ord=2)


def linear_system(seed: int = 0, **structure):
    a = torch.randn(L, N, N, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)
    return ls.LayerSystem.from_function(lambda m, h: m @ h, a, **structure), a


def layer_jacobians(system, trace):
    """Dense J_l at h_{l-1}, one layer at a time by reverse mode (not the code under test's batched JVPs)."""
    n = trace[0].numel()
    return torch.stack([torch.func.jacrev(lambda h: system.evaluate(slice(l, l + 1), h[None])[0])(trace[l])
                        .reshape(n, n) for l in range(system.num_layers)])


class TestLinear:
    system, a = linear_system(scales=torch.linspace(0.5, 1.5, L, dtype=DTYPE))
    trace = system.sequential(random_state((N,), seed=1))
    per_layer = torch.linspace(-1.0, 2.0, L, dtype=DTYPE)
    cases = {
        "Identity": (ls.Identity(), a - EYE),
        "Zero": (ls.Zero(), a),
        "Scaled(per layer)": (ls.Scaled(per_layer), a - per_layer[:, None, None] * EYE),
        "Scaled(system)": (ls.Scaled(), a - torch.linspace(0.5, 1.5, L, dtype=DTYPE)[:, None, None] * EYE),
        "Diagonal": (ls.Diagonal(), a - torch.diag_embed(a.diagonal(dim1=1, dim2=2))),
    }

    @pytest.mark.parametrize("name", cases)
    def test_matches_the_matrix_norm(self, name):
        jacobian, mismatch = self.cases[name]
        estimate = ls.surrogate_error(self.system, self.trace, jacobian, iters=300)
        assert estimate.dtype == torch.float64 and estimate.shape == (L,)
        torch.testing.assert_close(estimate, spectral(mismatch), rtol=1e-6, atol=0)

    def test_a_slice_is_those_layers(self):
        jacobian, mismatch = self.cases["Scaled(per layer)"]  # per-layer J~: a wrong offset shows
        estimate = ls.surrogate_error(self.system, self.trace, jacobian, layers=slice(2, 5), iters=300)
        torch.testing.assert_close(estimate, spectral(mismatch[2:5]), rtol=1e-6, atol=0)
        open_ended = ls.surrogate_error(self.system, self.trace, jacobian, layers=slice(3, None), iters=300)
        torch.testing.assert_close(open_ended, spectral(mismatch[3:]), rtol=1e-6, atol=0)

    def test_relative_divides_by_the_norm_of_the_jacobian(self):
        estimate = ls.surrogate_error(self.system, self.trace, ls.Identity(), iters=300, relative=True)
        torch.testing.assert_close(estimate, spectral(self.a - EYE) / spectral(self.a), rtol=1e-6, atol=0)
        jacobi = ls.surrogate_error(self.system, self.trace, ls.Zero(), iters=300, relative=True)
        torch.testing.assert_close(jacobi, torch.ones(L, dtype=DTYPE), rtol=1e-6, atol=0)  # ||J - 0|| / ||J||

    @pytest.mark.parametrize("jacobian", [ls.Exact(), ls.Exact(method=ls.GMRES())], ids=repr)
    def test_exact_has_no_error(self, jacobian):
        assert ls.surrogate_error(self.system, self.trace, jacobian, iters=3).abs().max() <= 1e-12

    def test_a_lower_bound_that_rises_with_iterations(self):
        """||A v|| of power iteration on A^T A never decreases, and never passes the norm."""
        exact = spectral(self.a)
        estimates = torch.stack([ls.surrogate_error(self.system, self.trace, ls.Zero(), iters=k)
                                 for k in (1, 2, 4, 8, 300)])
        assert (estimates <= exact * (1 + 1e-12)).all()
        assert (estimates[1:] >= estimates[:-1] * (1 - 1e-12)).all()
        assert (estimates[0] < exact * (1 - 1e-6)).any()  # one iteration is not yet the norm: the loop matters

    def test_seeded(self):
        first, again = (ls.surrogate_error(self.system, self.trace, ls.Zero(), iters=2, seed=5) for _ in range(2))
        assert torch.equal(first, again)
        assert not torch.equal(first, ls.surrogate_error(self.system, self.trace, ls.Zero(), iters=2, seed=6))


def test_identity_on_identity_blocks_is_zero():
    system = ls.LayerSystem.from_function(lambda w, h: h + 0 * w, torch.zeros(L, dtype=DTYPE))
    trace = system.sequential(random_state((3, N), seed=0))
    estimate = ls.surrogate_error(system, trace, ls.Identity(), iters=5)
    assert torch.equal(estimate, torch.zeros(L, dtype=torch.float64))
    assert torch.equal(ls.surrogate_error(system, trace, ls.Identity(), iters=5, relative=True), estimate)  # / ||I||


def test_nonlinear_blocks_are_linearized_at_each_layers_input():
    """J_l depends on h_{l-1}: the estimate equals the dense norm at the layer's input, not at its output."""
    system = residual_system(L, N, seed=2, gain=1.0, scales=torch.linspace(0.6, 1.0, L))
    trace = system.sequential(random_state((N,), seed=3))
    jac = layer_jacobians(system, trace)
    cases = {"Identity": (ls.Identity(), jac - EYE), "Scaled": (ls.Scaled(), jac - system.scales[:, None, None] * EYE),
             "Diagonal": (ls.Diagonal(), jac - torch.diag_embed(jac.diagonal(dim1=1, dim2=2)))}
    for name, (jacobian, mismatch) in cases.items():
        estimate = ls.surrogate_error(system, trace, jacobian, iters=300)
        torch.testing.assert_close(estimate, spectral(mismatch), rtol=1e-6, atol=1e-12, msg=name)


def test_mixing_on_a_stream_state():
    """On (S, D) states the mixing surrogate is M_l (x) I_D. The branch mixes the streams too (B_l), so the
    mismatch has no block structure, whose tied singular values would slow the power iteration."""
    streams, g = 3, torch.Generator().manual_seed(3)
    params = {"m": doubly_stochastic(L, streams, seed=3),
              "b": torch.randn(L, streams, streams, generator=g, dtype=DTYPE),
              "w": torch.randn(L, N, N, generator=g, dtype=DTYPE) / 2}
    system = ls.LayerSystem.from_function(lambda p, h: p["m"] @ h + 0.3 * torch.tanh(p["b"] @ h @ p["w"].T), params,
                                          mixing=params["m"], stream_dim=0)
    trace = system.sequential(random_state((streams, N), seed=4))
    jac = layer_jacobians(system, trace)
    kron = torch.stack([torch.kron(m, EYE) for m in params["m"]])
    mixing = ls.surrogate_error(system, trace, ls.Mixing(), iters=300)
    torch.testing.assert_close(mixing, spectral(jac - kron), rtol=1e-6, atol=0)
    identity = ls.surrogate_error(system, trace, ls.Identity(), iters=300)
    torch.testing.assert_close(identity, spectral(jac - torch.eye(streams * N, dtype=DTYPE)), rtol=1e-6, atol=0)
    assert (mixing < identity).all()


def test_every_iteration_is_one_batched_call():
    calls = []

    def jvp(layers, inputs, tangents):
        calls.append(inputs.shape[0])
        return torch.func.jvp(lambda x: x @ w[layers].transpose(1, 2), (inputs,), (tangents,))

    w = torch.randn(L, N, N, dtype=DTYPE)
    system = ls.LayerSystem(lambda layers, x: x @ w[layers].transpose(1, 2), L, jvp=jvp)
    trace = system.sequential(random_state((2, N), seed=0))
    ls.surrogate_error(system, trace, ls.Identity(), layers=slice(1, 5), iters=7)
    assert calls == [4] * (7 + 2)  # the transpose's trace, one per iteration, the final product; all 4 layers each


@given(problems(max_layers=5), st.sampled_from(["Zero", "Identity", "Scaled"]), st.integers(1, 6))
def test_never_above_the_norm(problem, kind, iters):
    system, h0 = problem
    trace = system.sequential(h0)
    jacobian = {"Zero": ls.Zero(), "Identity": ls.Identity(), "Scaled": ls.Scaled(0.5)}[kind]
    surrogate = {"Zero": 0.0, "Identity": 1.0, "Scaled": 0.5}[kind]
    bound = spectral(layer_jacobians(system, trace) - surrogate * torch.eye(h0.numel(), dtype=DTYPE))
    assert (ls.surrogate_error(system, trace, jacobian, iters=iters) <= bound * (1 + 1e-10) + 1e-12).all()


class TestRefusals:
    system, _ = linear_system()
    trace = system.sequential(random_state((N,), seed=1))

    @pytest.mark.parametrize("trace", [trace[:-1], trace[0], torch.cat([trace, trace[:1]])],
                             ids=["short", "one state", "long"])
    def test_trace_of_the_wrong_length(self, trace):
        with pytest.raises(ValueError, match=r"trace must be the \(L\+1, \*S\) = \(7, ...\)"):
            ls.surrogate_error(self.system, trace, ls.Identity())

    @pytest.mark.parametrize("layers", [slice(0, L + 1), slice(3, 3), slice(-1, L), slice(0, L, 2), slice(4, 2),
                                        (0, 3), 2], ids=repr)
    def test_unknown_layers(self, layers):
        with pytest.raises(ValueError, match=r"layers must be a slice\(start, stop\) with 0 <= start < stop <= 6"):
            ls.surrogate_error(self.system, self.trace, ls.Identity(), layers=layers)

    def test_other_arguments(self):
        with pytest.raises(TypeError, match="jacobian must be a Jacobian strategy"):
            ls.surrogate_error(self.system, self.trace, ls.GMRES())
        with pytest.raises(ValueError, match="iters must be a positive int"):
            ls.surrogate_error(self.system, self.trace, ls.Identity(), iters=0)
        broken = self.trace.clone()
        broken[2, 1] = float("inf")
        with pytest.raises(ValueError, match=r"trace has non-finite values .* h_0 \.\. h_5"):
            ls.surrogate_error(self.system, broken, ls.Identity())
        assert ls.surrogate_error(self.system, broken, ls.Identity(), layers=slice(3, L)).isfinite().all()
        with pytest.raises(TypeError, match=r"trace\[0\] has dtype torch.float32"):
            ls.surrogate_error(self.system, self.trace.float(), ls.Identity())
        with pytest.raises(ValueError, match="Scaled: a must be a number or have 6 entries"):
            ls.surrogate_error(self.system, self.trace, ls.Scaled([1.0, 2.0]))
