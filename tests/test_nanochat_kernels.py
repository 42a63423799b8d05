"""models.nanochat.kernels: the fused x0 / residual blend and RMSNorm against its torch reference (compiled on
CUDA, interpreted on the CPU, tiny shapes), the reference against the block's own maths, and the dispatch."""

import pytest
import torch
import torch.nn.functional as F

from models.nanochat import block
from models.nanochat import kernels as nk
from kernel_support import DEVICE, kernels_on, ulp_tolerance  # noqa: F401  (kernels_on is a fixture)

pytestmark = pytest.mark.usefixtures("kernels_on")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# h shapes (n, ..., D): a (B, T, D) state, mHC's (B, S, T, D), a width that is not a power of two, one row.
SHAPES = [(3, 2, 5, 32), (2, 1, 2, 3, 16), (4, 3, 48), (1, 1, 8)]


def randn(*shape, seed, dtype, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(DEVICE, dtype)


def blend_args(shape, dtype, seed=0, scale=1.0):
    n = shape[0]
    lambdas = torch.rand(2, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float32).to(DEVICE)
    return randn(*shape, seed=seed, dtype=dtype, scale=scale), randn(*shape[1:], seed=seed + 1, dtype=dtype,
                                                                     scale=scale), 0.5 + lambdas[0], lambdas[1]


def tolerance(dtype):
    """y against F.rms_norm of the same x: squares summed in another order and rsqrt's few float32 ulps, then one
    rounding to the dtype (kernel_support.ulp_tolerance)."""
    return ulp_tolerance(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_blend_norm_kernel_matches_its_reference(shape, dtype):
    """x: the products and the sum are rounded per op as torch's are, so the two agree to rounding: exactly on a GPU
    (round to nearest), and within a few ulps of the operands' magnitude under the interpreter, whose bfloat16
    conversion truncates (where resid h and lambda x0 cancel, that is many ulps of x itself). y is checked as the
    norm of the kernel's own x."""
    h, x0, resid, x0_lambda = args = blend_args(shape, dtype)
    x, y = nk.blend_norm_triton(*args)
    want_x, _ = nk.blend_norm_reference(*args)
    assert x.shape == y.shape == shape and x.dtype == y.dtype == dtype
    operands = (resid.view(-1, *[1] * (h.ndim - 1)) * h.double()).abs() + (x0_lambda.view(-1, *[1] * (h.ndim - 1))
                                                                           * x0.double()).abs()
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(x.double(), want_x.double(), rtol=4 * eps, atol=4 * eps * float(operands.max()))
    if DEVICE == "cpu" and dtype != torch.bfloat16:  # numpy: no fused multiply-add, float16 rounds to nearest
        assert torch.equal(x, want_x)
    torch.testing.assert_close(y.double(), F.rms_norm(x, (shape[-1],)).double(), **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_plain_norm_kernel_matches_rms_norm(dtype):
    h = randn(3, 4, 24, seed=3, dtype=dtype)
    x, y = nk.blend_norm_triton(h, None, None, None)
    assert x is h
    torch.testing.assert_close(y.double(), F.rms_norm(h, (24,)).double(), **tolerance(dtype))
    torch.testing.assert_close(nk.rms_norm(h).double(), F.rms_norm(h, (24,)).double(), **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_kernel_adds_rms_norms_default_eps(dtype):
    """States of size ~1e-4: mean(x^2) ~ 1e-8 is below float32's eps (1.2e-7), so a different eps (bfloat16's,
    none) changes y by far more than the tolerance."""
    args = blend_args((2, 3, 16), dtype, seed=5, scale=1e-4)
    torch.testing.assert_close(nk.blend_norm_triton(*args)[1].double(), nk.blend_norm_reference(*args)[1].double(),
                               **tolerance(dtype))


def test_blend_norm_kernel_reads_non_contiguous_inputs():
    h, x0, resid, x0_lambda = blend_args((3, 5, 2, 16), torch.float64, seed=7)
    h_t, x0_t = h.transpose(1, 2), x0.transpose(0, 1)  # (n, 2, 5, 16) and (2, 5, 16), rows not in order
    assert not h_t.is_contiguous()
    got = nk.blend_norm_triton(h_t, x0_t, resid, x0_lambda)
    want = nk.blend_norm_reference(h_t.contiguous(), x0_t.contiguous(), resid, x0_lambda)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tolerance(torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reference_is_the_blocks_maths(dtype):
    """Exactly nanochat's blend, each layer's lambdas in h's dtype (what block._attention_input computes on the CPU
    through kernels.blend), and block.norm (F.rms_norm over the last dim)."""
    h, x0, resid, x0_lambda = blend_args((3, 2, 4, 16), dtype, seed=9)
    x, y = nk.blend_norm_reference(h, x0, resid, x0_lambda)
    blended = torch.stack([resid[i].to(dtype) * h[i] + x0_lambda[i].to(dtype) * x0 for i in range(3)])
    assert torch.equal(x, blended)
    assert torch.equal(y, block.norm(blended))


def test_blend_norm_takes_torch_without_the_interpreter_or_with_autograd(monkeypatch):
    monkeypatch.setattr(nk, "blend_norm_triton", lambda *args: pytest.fail("the kernel was launched"))
    h, x0, resid, x0_lambda = blend_args((2, 3, 8), torch.float32, seed=11)
    resid.requires_grad_()
    x, y = nk.blend_norm(h, x0, resid, x0_lambda)  # autograd through resid: the kernel has no backward
    y.sum().backward()
    assert resid.grad is not None
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, x0, resid, x0_lambda = [t.cpu() for t in blend_args((2, 3, 8), torch.float32, seed=11)]
    x, y = nk.blend_norm(h, x0, resid, x0_lambda)
    assert torch.equal(y, nk.blend_norm_reference(h, x0, resid, x0_lambda)[1])


def test_blend_norm_under_jvp_differentiates_the_torch_maths():
    """The system's JVPs run the blocks under torch.func.jvp: blend_norm must leave those to torch."""
    h, x0, resid, x0_lambda = blend_args((2, 3, 8), torch.float64, seed=12)
    tangent = randn(2, 3, 8, seed=14, dtype=torch.float64)
    got = torch.func.jvp(lambda v: nk.blend_norm(v, x0, resid, x0_lambda), (h,), (tangent,))[1]
    want = torch.func.jvp(lambda v: nk.blend_norm_reference(v, x0, resid, x0_lambda), (h,), (tangent,))[1]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_blend_norm_takes_the_kernel_where_dispatch_says(monkeypatch):
    calls = []
    original = nk.blend_norm_triton
    monkeypatch.setattr(nk, "blend_norm_triton", lambda *args: calls.append(1) or original(*args))
    nk.blend_norm(*blend_args((2, 3, 8), torch.float32, seed=13))
    assert calls == [1]


def test_blend_norm_refuses_bad_arguments():
    h, x0, resid, x0_lambda = blend_args((2, 3, 8), torch.float32, seed=15)
    with pytest.raises(ValueError, match="x0 must have h's dtype"):
        nk.blend_norm(h, x0[:2], resid, x0_lambda)
    with pytest.raises(ValueError, match=r"resid must be a floating tensor of shape \(n=2,\)"):
        nk.blend_norm(h, x0, resid[:1], x0_lambda)
    with pytest.raises(ValueError, match="must be given together"):
        nk.blend_norm(h, x0, None, x0_lambda)
    with pytest.raises(TypeError, match="h must be a float16"):
        nk.blend_norm(h.long(), None, None, None)


@pytest.mark.parametrize("blend", [False, True], ids=["no_x0_resid", "x0_resid"])
def test_the_blocks_take_the_kernel_and_keep_their_logits(monkeypatch, blend):
    """Where dispatch allows (here the interpreter; on a GPU, CUDA), every block's attention input is one blend_norm
    launch, and the model's logits (sequential and layer-parallel) are those of the torch path to float32
    rounding."""
    from helpers import random_model, tiny_config, tokens
    from models.inference import snlp

    model = random_model(tiny_config(n_layer=3, no_x0_resid=not blend, no_ve=True), seed=2,
                         dtype=torch.float32).to(DEVICE)
    idx = tokens(1, 8, seed=2).to(DEVICE)
    plan = snlp.Plan(n_par=2, iters=1)
    launches = []
    with torch.no_grad():
        with monkeypatch.context() as patch:
            patch.setattr(block, "interpreting", lambda: False)  # the CPU path: torch maths, no kernel
            expected = model(idx), snlp.forward(model, idx, plan).logits
        triton = nk.blend_norm_triton
        monkeypatch.setattr(nk, "blend_norm_triton", lambda *args: launches.append(args[2] is not None) or triton(*args))
        got = model(idx), snlp.forward(model, idx, plan).logits
    assert launches and all(b == blend for b in launches)  # 3 blocks, then 1 prefix block and the tail's call
    assert len(launches) == 5
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
