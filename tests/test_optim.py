"""Our Muon: its update against the formula in float64, and step for step against torch.optim.Muon."""

import math

import pytest
import torch

from models.training.muon import Muon

SHAPES = [(6, 4), (3, 5)]  # tall (orthogonalized transposed, lr scaled by sqrt(6/4)) and wide


def weights_and_gradients(dtype, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES]
    grads = [[torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in SHAPES] for _ in range(steps)]
    return weights, grads


def run(optimizer_class, weights, grads, **options):
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    opt = optimizer_class(params, **options)
    for step_grads in grads:
        for p, grad in zip(params, step_grads):
            p.grad = grad.clone()
        opt.step()
    return [p.detach() for p in params]


def newton_schulz(u):
    """Five quintic steps X <- a X + b (X X^T) X + c (X X^T)^2 X on the wide orientation, from X = U / ||U||_F."""
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = u.shape[0] > u.shape[1]
    x = u.T if tall else u
    x = x / x.norm()
    for _ in range(5):
        gram = x @ x.T
        x = a * x + b * gram @ x + c * gram @ gram @ x
    return x.T if tall else x


def test_update_is_the_formula_in_float64():
    lr, mu, wd = 0.02, 0.95, 0.1
    weights, grads = weights_and_gradients(torch.float64)
    expected = []
    for i, w in enumerate(weights):
        buffer = torch.zeros_like(w)
        for step_grads in grads:
            g = step_grads[i]
            buffer = mu * buffer + (1 - mu) * g
            update = newton_schulz((1 - mu) * g + mu * buffer)
            w = (1 - lr * wd) * w - lr * math.sqrt(max(1, w.shape[0] / w.shape[1])) * update
        expected.append(w)
    got = run(Muon, weights, grads, lr=lr, momentum=mu, weight_decay=wd, ns_dtype=torch.float64)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_matches_torch_muon_step_for_step_in_bfloat16():
    """torch.optim.Muon orthogonalizes in bfloat16 on every device; ours with ns_dtype=bfloat16 makes the same
    operations in the same order, so the weights agree bit for bit."""
    weights, grads = weights_and_gradients(torch.float32)
    options = dict(lr=0.02, momentum=0.95, weight_decay=0.1)
    ours = run(Muon, weights, grads, ns_dtype=torch.bfloat16, **options)
    theirs = run(torch.optim.Muon, weights, grads, adjust_lr_fn="original", **options)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


def test_cpu_default_orthogonalizes_in_float32():
    """Against the float64 formula, float32 rounds the weights (|w| <= 4: 2.4e-7 per step) and the orthogonalized
    update (O(1e-6) relative, times lr = 0.02): within 1e-6 (measured 2.3e-7). bfloat16 is 8e-4 off."""
    weights, grads = weights_and_gradients(torch.float32)
    got = run(Muon, weights, grads, lr=0.02)
    exact = run(Muon, [w.double() for w in weights], [[g.double() for g in s] for s in grads], lr=0.02,
                ns_dtype=torch.float64)
    for a, b in zip(got, exact):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=0, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(got, run(Muon, weights, grads, lr=0.02,
                                                              ns_dtype=torch.bfloat16)))


def test_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="parameters must be 2-D matrices, got one of shape \\(3,\\)"):
        Muon([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    with pytest.raises(ValueError, match="lr must be a number >= 0, got -1"):
        Muon([torch.nn.Parameter(torch.zeros(2, 2))], lr=-1)
