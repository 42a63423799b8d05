"""Recurrence solvers: every associative scan equals its sequential sweep, and every combine is associative."""

import pytest
import torch
from hypothesis import given, strategies as st

import layersolve as ls
from layersolve._recurrence import _elementwise_combine, _matrix_combine, layer_norms
from helpers import DTYPE

shapes = st.tuples(st.integers(1, 12), st.integers(1, 3), st.integers(1, 4))  # (n, S, D)


def tensor(shape, seed, scale=1.0):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def maps(n, s, d, seed):
    """One map of every structure for states (S, D); coefficients of norm ~0.5-1 so products stay O(1)."""
    return {
        "zero": ls.ZeroMap(),
        "identity": ls.IdentityMap(),
        "one scalar": ls.ElementwiseMap(torch.tensor(0.8, dtype=DTYPE)),
        "scalar per layer": ls.ElementwiseMap(tensor((n,), seed)),
        "diagonal": ls.ElementwiseMap(tensor((n, s, d), seed)),
        "stream matrix": ls.MatrixMap(tensor((n, s, s), seed, 0.5), dim=0),
        "per-column matrix": ls.MatrixMap(tensor((n, d, s, s), seed, 0.5), dim=0),
        "dense": ls.MatrixMap(tensor((n, s * d, s * d), seed, 0.5 / (s * d) ** 0.5), dim=None),
    }


@given(shapes, st.integers(0, 1000))
def test_scan_equals_sweep(shape, seed):
    n, s, d = shape
    b = tensor((n, s, d), seed + 1)
    for name, m in maps(n, s, d, seed).items():
        torch.testing.assert_close(m.solve(b, ls.Scan()), m.solve(b, ls.Sweep()), rtol=1e-12, atol=1e-12, msg=name)


@given(shapes, st.integers(0, 1000))
def test_sweep_is_the_recurrence(shape, seed):
    """x_l = A_l x_{l-1} + b_l, x_0 = 0, checked against `apply` one step at a time."""
    n, s, d = shape
    b = tensor((n, s, d), seed + 1)
    for name, m in maps(n, s, d, seed).items():
        x = m.solve(b, ls.Sweep())
        previous = torch.cat([torch.zeros_like(x[:1]), x[:-1]])
        torch.testing.assert_close(x, m.apply(previous) + b, rtol=1e-12, atol=1e-12, msg=name)


@given(st.integers(1, 4), st.integers(0, 1000))
def test_elementwise_combine_is_associative(size, seed):
    x, y, z = [(tensor((size,), seed + i), tensor((size,), seed + 10 + i)) for i in range(3)]
    left = _elementwise_combine(_elementwise_combine(z, y), x)
    right = _elementwise_combine(z, _elementwise_combine(y, x))
    for a, b in zip(left, right):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@given(st.integers(1, 4), st.integers(0, 1000))
def test_matrix_combine_is_associative(size, seed):
    x, y, z = [(tensor((size, size), seed + i), tensor((size,), seed + 10 + i)) for i in range(3)]
    left = _matrix_combine(_matrix_combine(z, y), x)
    right = _matrix_combine(z, _matrix_combine(y, x))
    for a, b in zip(left, right):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_associative_scan_is_an_inclusive_prefix():
    values = torch.arange(1, 12, dtype=DTYPE)
    (out,) = ls.associative_scan(lambda later, earlier: (later[0] + earlier[0],), (values,))
    torch.testing.assert_close(out, torch.cumsum(values, 0))


def test_scaled_maps():
    n, s, d = 5, 2, 3
    b = tensor((n, s, d), 0)
    for name, m in maps(n, s, d, 3).items():
        torch.testing.assert_close(m.scaled(0.5).apply(b), 0.5 * m.apply(b), msg=name)
        assert isinstance(m.scaled(0.0), ls.ZeroMap)


def test_a_scaled_identity_meets_the_state_on_its_device():
    """Damped IDN is ElementwiseMap(a CPU scalar): expanded per layer, it must follow the state (here the meta
    device, standing in for CUDA)."""
    b = torch.ones(3, 4, dtype=DTYPE, device="meta")
    assert ls.IdentityMap().scaled(0.5).solve(b).device == b.device


def test_identity_scan_of_large_layers_is_the_prefix_sum():
    """Layers of 1,024 numbers or more take the CPU's n - 1 adds instead of cumsum: the same prefix sums (equal in
    float64, to float32 rounding in float32), and differentiable like cumsum."""
    b = tensor((5, 2, 600), 3).requires_grad_()
    x = ls.IdentityMap().solve(b, ls.Scan())
    assert torch.equal(x, torch.cumsum(b, dim=0))
    x.sum().backward()
    assert torch.equal(b.grad[:, 0, 0], torch.tensor([5.0, 4, 3, 2, 1], dtype=DTYPE))  # d(sum of prefix sums)/db_l
    b32 = b.detach().float()
    torch.testing.assert_close(ls.IdentityMap().solve(b32, ls.Scan()), torch.cumsum(b32, dim=0))


@pytest.mark.parametrize("scale", [1e-30, 1e-12, 1.0, 1e25])
def test_layer_norms_of_float32_stacks_survive_overflow_and_underflow(scale):
    """Large float32 stacks are reduced in float32 unless a norm could have overflowed or underflowed there: at 1e25 the
    squares overflow float32 and at 1e-30 they underflow, and the norms still match float64's; a zero layer (an
    exact layer's residual) is zero."""
    x = tensor((3, 4, 6000), 5, scale)  # 72k numbers: the float32 path
    x[1] = 0
    expected = torch.linalg.vector_norm(x.flatten(1), dim=1)
    got = layer_norms(x.float())
    assert got.dtype == torch.float64 and got[1] == 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_layer_norms_reduce_again_the_layers_that_need_it():
    """One stack with a layer whose float32 squares underflow, an ordinary one, a zero one and one whose squares
    overflow: each norm matches float64's."""
    x = torch.cat([tensor((1, 4, 6000), 6, scale) for scale in (1e-30, 1.0, 0.0, 1e25)])
    got = layer_norms(x.float())
    torch.testing.assert_close(got, torch.linalg.vector_norm(x.flatten(1), dim=1), rtol=1e-5, atol=0)
