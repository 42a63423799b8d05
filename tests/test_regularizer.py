"""The SNLP-aware regularizer against direct computations of the published forms (float64)."""


import pytest
import torch

import layersolve as ls
from helpers import random_model, tiny_config, tokens
from models.training.regularizer import Regularizer, one_iteration, snlp_loss

MODES = ("all", "batched")


def sequential_trace(model, idx):
    emb = model.embed(idx)
    return emb, model.trace(emb)


def gap(approx, target):
    """The published relative L2 gap: mean over tokens of ||approx - target|| / max(||target||, 1e-6)."""
    return ((approx - target).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-6)).mean()


def direct_idn_loss(model, emb, trace, n, compared):
    """IDN K = 1 from h_init = h_{L-n}: h~_j = h_init + sum_{i<=j} (f_i(h_init) - h_init), at tail positions j."""
    L = model.config.n_layer
    h_init = trace[L - n]
    branches = [model.block(L - n + i, h_init, emb) - h_init for i in range(n)]
    return sum(gap(h_init + sum(branches[:j + 1]), trace[L - n + j + 1]) for j in compared)


def test_compared_positions_follow_the_published_stride():
    """j >= 1 with (j + 1) % stride == 0, and the last; layer 0 is exact after one iteration and never enters."""
    assert Regularizer(stride=1).selected(4) == [1, 2, 3]
    assert Regularizer(stride=2).selected(5) == [1, 3, 4] and Regularizer(stride=2).selected(2) == [1]
    assert Regularizer(stride=3).selected(8) == [2, 5, 7]
    assert Regularizer(stride=8).selected(8) == [7] and Regularizer(stride=1).selected(1) == []


@pytest.mark.parametrize("overrides", [dict(), dict(use_mhc=True, mhc_num_streams=2)])
@pytest.mark.parametrize("mode", MODES)
def test_strided_value_is_the_idn_prefix_sum(overrides, mode):
    model = random_model(tiny_config(**overrides), seed=1)
    emb, trace = sequential_trace(model, tokens(2, 24, seed=1))
    reg = Regularizer(n_par_configs=(2, 5), stride=2, mode=mode)
    expected = direct_idn_loss(model, emb, trace, 2, [1]) + direct_idn_loss(model, emb, trace, 5, [1, 3, 4])
    # The driver's prefix sum adds the same terms in another order: rounding of a few ulps of the states.
    torch.testing.assert_close(snlp_loss(model, emb, trace, reg), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("overrides", [dict(), dict(use_mhc=True, mhc_num_streams=2)])
@pytest.mark.parametrize("mode", MODES)
def test_stride_zero_is_the_last_block_alone(overrides, mode):
    """The published default: f_L(h_{L-n}), the last block on the state n layers back, against h_L."""
    model = random_model(tiny_config(**overrides), seed=5)
    emb, trace = sequential_trace(model, tokens(2, 24, seed=5))
    L = model.config.n_layer
    reg = Regularizer(n_par_configs=(2, 5), stride=0, mode=mode)
    expected = sum(gap(model.block(L - 1, trace[L - n], emb), trace[L]) for n in (2, 5))
    torch.testing.assert_close(snlp_loss(model, emb, trace, reg), expected, rtol=1e-14, atol=0)
    corrected = direct_idn_loss(model, emb, trace, 2, [1]) + direct_idn_loss(model, emb, trace, 5, [4])
    assert abs(float(expected - corrected)) > 1e-3  # the corrected last layer is another number


def test_stride_zero_takes_no_surrogate():
    model = random_model(tiny_config(use_mhc=True, mhc_num_streams=2), seed=1)
    with pytest.raises(ValueError, match="stride 0 compares the last block alone"):
        Regularizer(ls.Mixing(), (2,), stride=0).check(model)
    with pytest.raises(ValueError, match="stride must be an int >= 0"):
        Regularizer(n_par_configs=(2,), stride=-1).check(model)


def test_sample_mode_draws_one_config_per_step():
    model = random_model(tiny_config(), seed=2)
    emb, trace = sequential_trace(model, tokens(1, 16, seed=2))
    reg = Regularizer(n_par_configs=(2, 4), mode="sample")
    drawn = [reg.configs(step) for step in range(20)]
    assert all(len(d) == 1 for d in drawn) and {d[0] for d in drawn} == {2, 4}
    single = Regularizer(n_par_configs=drawn[7])
    torch.testing.assert_close(snlp_loss(model, emb, trace, reg, step=7), snlp_loss(model, emb, trace, single),
                               rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("jacobian", [ls.Identity(), ls.Scaled(), ls.Diagonal(probes=1), ls.Mixing()])
def test_variants_are_their_one_iteration_solves(jacobian, mode):
    """Every variant's approximation is layersolve's own K = 1 solve from repeat, also when the evaluations come
    from the batched call."""
    model = random_model(tiny_config(use_mhc=True, mhc_num_streams=2), seed=3)
    emb, trace = sequential_trace(model, tokens(1, 16, seed=3))
    system = model.layer_system(emb, 3)
    sol = ls.solve(system, trace[3], ls.Newton(jacobian=jacobian), iters=1)
    expected = sum(gap(sol.trace[j + 1], trace[4 + j]) for j in (1, 2))
    torch.testing.assert_close(snlp_loss(model, emb, trace, Regularizer(jacobian, (3,), mode=mode)), expected,
                               rtol=1e-12, atol=0)


def test_surrogate_coefficients_are_constants_to_the_gradient():
    """With the exact diagonal J~_l = diag(J_l(h_{L-n})), the gradient is that of the recurrence with the diagonal
    detached: delta_l = d_l delta_{l-1} + (f_l(h) - h), h~ = h + delta."""
    model = random_model(tiny_config(), seed=6).requires_grad_(True)
    emb, trace = sequential_trace(model, tokens(1, 3, seed=6))
    L, n = model.config.n_layer, 3
    start = trace[L - n]
    loss = snlp_loss(model, emb, trace, Regularizer(ls.Diagonal(), (n,)))
    got = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True, retain_graph=True)

    expected, delta = 0.0, torch.zeros_like(start)
    for j in range(n):
        block = (lambda h, i=L - n + j: model.block(i, h, emb))
        jacobian = torch.autograd.functional.jacobian(block, start.detach(), vectorize=True)
        diagonal = jacobian.reshape(start.numel(), -1).diagonal()
        delta = diagonal.reshape(start.shape) * delta + (block(start) - start)
        expected = expected + (gap(start + delta, trace[L - n + j + 1]) if j >= 1 else 0.0)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    want = torch.autograd.grad(expected, list(model.parameters()), allow_unused=True)
    assert sum(g is not None for g in got) > 10
    for name, a, b in zip(dict(model.named_parameters()), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_with_and_without_a_detached_target(detach):
    model = random_model(tiny_config(), seed=4, dtype=torch.float32).requires_grad_(True)
    emb, trace = sequential_trace(model, tokens(1, 16, seed=4))
    trace = [t.detach().requires_grad_() for t in trace]
    loss = snlp_loss(model, emb, trace, Regularizer(n_par_configs=(3,), detach_target=detach))
    loss.backward()
    assert trace[3].grad is not None and trace[3].grad.abs().sum() > 0  # the start h_{L-n} is always live
    target_grad = trace[6].grad
    assert (target_grad is None) == detach
    assert model.transformer.h[5].mlp.c_fc.weight.grad.abs().sum() > 0  # the approximation trains the blocks


@pytest.mark.parametrize("structure", ["scales", "mixing"])
def test_one_iteration_holds_any_systems_coefficients_constant(structure):
    """On a system whose own skip coefficients require grad (f_l(h) = M_l h + tanh(h W_l^T), with M_l = a_l I or a
    stream mixing), the gradient reaches them only through the evaluations f_l(h), not through J~_l = M_l."""
    g = torch.Generator().manual_seed(7)
    n, streams, width = 4, 3, 5
    w = torch.randn(n, width, width, generator=g, dtype=torch.float64) / width ** 0.5
    if structure == "scales":
        coefficients = (0.5 + torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_()
        matrices = coefficients[:, None, None] * torch.eye(streams, dtype=torch.float64)
        structure_kw, jacobian = dict(scales=coefficients), ls.Scaled()
    else:
        coefficients = torch.rand(n, streams, streams, generator=g, dtype=torch.float64).requires_grad_()
        matrices = coefficients
        structure_kw, jacobian = dict(mixing=coefficients, stream_dim=0), ls.Mixing()
    system = ls.LayerSystem.from_function(lambda p, h: p[0] @ h + torch.tanh(h @ p[1].T), (matrices, w),
                                          **structure_kw)
    start = torch.randn(streams, width, generator=g, dtype=torch.float64)
    solved = one_iteration(system, start, jacobian, seed=0)

    delta, expected = torch.zeros_like(start), [start]
    for layer in range(n):
        delta = matrices[layer].detach() @ delta + (system.evaluate(slice(layer, layer + 1), start[None])[0] - start)
        expected.append(start + delta)
    expected = torch.stack(expected)
    torch.testing.assert_close(solved, expected, rtol=1e-14, atol=1e-14)
    weights = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    got, = torch.autograd.grad((solved * weights).sum(), coefficients, retain_graph=True)
    want, = torch.autograd.grad((expected * weights).sum(), coefficients)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
