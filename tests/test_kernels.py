"""layersolve.kernels: each Triton kernel against its torch reference (compiled on CUDA, interpreted on the CPU,
tiny shapes), each reference against the recurrence maps' own solves, the dispatch, and the driver on the kernel
path against the torch path."""

import pytest
import torch

import layersolve as ls
from layersolve import kernels
from layersolve.kernels import dispatch
from helpers import residual_block, residual_blocks
from kernel_support import DEVICE, kernels_on, ulp_tolerance  # noqa: F401  (kernels_on is a fixture)

pytestmark = pytest.mark.usefixtures("kernels_on")
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# (n, state): a state of 300 entries spans three 128-column programs, the last one masked; n = 1 is one layer.
SHAPES = [(5, (3, 100)), (1, (7,)), (4, (2, 3, 5))]
MODES = ["identity", "one scalar", "scalar per layer", "diagonal"]  # A_l = I, a I, a_l I, diag(a_l)


def randn(*shape, seed, dtype=torch.float64, device=DEVICE):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(device, dtype)


def step(n, state, seed, dtype=torch.float64, device=DEVICE):
    """A trace (n+1, *S) and outputs near it, as in a solve (outputs = trace[1:] + a residual)."""
    trace = randn(n + 1, *state, seed=seed, dtype=dtype, device=device)
    return trace, (trace[1:].double() + 0.3 * randn(n, *state, seed=seed + 1, device=device)).to(dtype)


def coefficients(mode, n, state, seed, dtype):
    if mode == "identity":
        return None
    if mode == "one scalar":
        return torch.tensor(0.7, dtype=torch.float64, device=DEVICE)
    if mode == "scalar per layer":
        return 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)
    return (0.5 + 0.5 * randn(n, *state, seed=seed)).to(dtype)  # a diagonal, in the state dtype as Diagonal's


def assert_step_close(got, want, dtype):
    torch.testing.assert_close(got[0].double(), want[0].double(), **ulp_tolerance(dtype))
    torch.testing.assert_close(got[1], want[1], **ulp_tolerance(torch.promote_types(dtype, torch.float32)))


# -- dispatch ----------------------------------------------------------------------------------------------------

def test_dispatch_picks_torch_for_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.zeros(3, 4)
    assert not kernels.use_triton(cpu)
    monkeypatch.setattr(kernels, "correction", lambda *args: pytest.fail("a kernel launched on a CPU tensor"))
    trace, outputs = step(3, (4,), seed=0, device="cpu")
    new, _ = ls.IdentityMap().correct(trace, outputs)
    torch.testing.assert_close(new[1:], trace[1:] + torch.cumsum(outputs - trace[1:], 0))


def test_dispatch_refuses_autograd_mixed_devices_and_other_dtypes():
    x = torch.zeros(3, 4, device=DEVICE)
    assert kernels.use_triton(x, x.double())
    assert not kernels.use_triton(x.requires_grad_())
    with torch.no_grad():
        assert kernels.use_triton(x)
    assert not kernels.use_triton(torch.zeros(3, dtype=torch.int64, device=DEVICE))
    assert not kernels.use_triton(torch.zeros(3, dtype=torch.complex64, device=DEVICE))
    assert not kernels.use_triton()
    if DEVICE == "cuda":
        assert not kernels.use_triton(x.detach(), torch.zeros(3, 4))


def test_dispatch_refuses_transformed_and_dual_tensors():
    """vmap / jvp wrap their tensors and forward-mode AD carries tangents: a kernel would read the bare values."""
    seen = []
    torch.func.vmap(lambda x: seen.append(kernels.use_triton(x)) or x)(torch.zeros(2, 3, device=DEVICE))
    torch.func.jvp(lambda x: seen.append(kernels.use_triton(x)) or x, (torch.zeros(3, device=DEVICE),),
                   (torch.ones(3, device=DEVICE),))
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE))
        seen.append(kernels.use_triton(dual))
    assert seen == [False, False, False]
    assert kernels.use_triton(torch.nn.Parameter(torch.zeros(3, device=DEVICE), requires_grad=False))


def test_dispatch_keeps_torch_while_compiling(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not kernels.use_triton(torch.zeros(3, device=DEVICE))


def test_dispatch_sees_the_interpreter_switch(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not dispatch.interpreting()


# -- correction --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n, state", SHAPES, ids=str)
def test_correction_kernel_matches_its_reference(n, state, mode, dtype):
    trace, outputs = step(n, state, seed=n, dtype=dtype)
    a = coefficients(mode, n, state, seed=n + 2, dtype=dtype)
    got = kernels.correction(trace, outputs, a)
    assert got[0].shape == trace.shape and got[0].dtype == dtype and got[1].dtype == torch.float64
    assert torch.equal(got[0][0], trace[0])
    assert_step_close(got, kernels.correction_reference(trace, outputs, a), dtype)


@pytest.mark.parametrize("mode", MODES)
def test_correction_reference_is_the_maps_solve(mode):
    """The reference (the kernel's oracle) against LinearMap.solve, scan and sweep, float64: both are exact
    arithmetic up to rounding of O(1) sums over 6 layers."""
    n, state = 6, (2, 5)
    trace, outputs = step(n, state, seed=3)
    a = coefficients(mode, n, state, seed=4, dtype=torch.float64)
    linear_map = ls.IdentityMap() if a is None else ls.ElementwiseMap(a)
    new, squares = kernels.correction_reference(trace, outputs, a)
    for recurrence in (ls.Scan(), ls.Sweep()):
        delta = linear_map.solve(outputs - trace[1:], recurrence)
        torch.testing.assert_close(new, torch.cat([trace[:1], trace[1:] + delta]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(squares, delta.flatten(1).square().sum(1), rtol=1e-12, atol=1e-12)


def test_correction_reads_strided_and_non_contiguous_inputs():
    n, state = 4, (3, 50)
    longer, _ = step(n + 1, state, seed=5)
    trace = longer[1:]  # a slice: rows read in place, with the parent's offset
    wide = randn(n, 3, 100, seed=6)
    every_other = wide[..., ::2]  # flattens to a view with column stride 2: must be copied first
    assert every_other.reshape(n, -1).stride(1) == 2
    a = coefficients("diagonal", n, state, seed=6, dtype=torch.float64).transpose(1, 2).contiguous().transpose(1, 2)
    assert not a.is_contiguous()
    for coefficient in (None, a):
        want = kernels.correction_reference(trace.contiguous(), every_other.contiguous(), coefficient)
        assert_step_close(kernels.correction(trace, every_other, coefficient), want, torch.float64)


def test_correction_refuses_bad_arguments():
    trace, outputs = step(3, (4,), seed=7)
    with pytest.raises(ValueError, match="outputs must have shape"):
        kernels.correction(trace, outputs[:2])
    with pytest.raises(TypeError, match="outputs must have the trace's dtype"):
        kernels.correction(trace, outputs.float())
    with pytest.raises(TypeError, match="trace must be float16"):
        kernels.correction(trace.long(), outputs)
    with pytest.raises(ValueError, match="a must be None, a scalar"):
        kernels.correction(trace, outputs, torch.ones(2, device=DEVICE))


# -- mixing ------------------------------------------------------------------------------------------------------

MIXING_CASES = [  # (n, state, dim): the transformer layout (B, S, T, D), streams first and last, S = 1 and 3
    (5, (2, 4, 3, 7), 1), (3, (3, 40), 0), (4, (30, 1), 1), (2, (2, 3, 4), 2), (6, (4, 64), 0)]


def stochastic(n, streams, seed):
    m = torch.rand(n, streams, streams, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.1
    return (m / m.sum(-1, keepdim=True)).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, state, dim", MIXING_CASES, ids=str)
def test_mixing_kernel_matches_its_reference(n, state, dim, dtype):
    trace, outputs = step(n, state, seed=n + dim, dtype=dtype)
    m = stochastic(n, state[dim], seed=dim)
    got = kernels.mixing_correction(trace, outputs, m, dim)
    assert got[0].shape == trace.shape and torch.equal(got[0][0], trace[0])
    assert_step_close(got, kernels.mixing_correction_reference(trace, outputs, m, dim), dtype)


@pytest.mark.parametrize("n, state, dim", MIXING_CASES, ids=str)
def test_mixing_reference_is_the_maps_solve(n, state, dim):
    trace, outputs = step(n, state, seed=11)
    m = stochastic(n, state[dim], seed=12)
    new, squares = kernels.mixing_correction_reference(trace, outputs, m, dim)
    for recurrence in (ls.Scan(), ls.Sweep()):
        delta = ls.MatrixMap(m, dim).solve(outputs - trace[1:], recurrence)
        torch.testing.assert_close(new, torch.cat([trace[:1], trace[1:] + delta]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(squares, delta.flatten(1).square().sum(1), rtol=1e-12, atol=1e-12)


def test_mixing_refuses_bad_arguments():
    trace, outputs = step(3, (2, 4), seed=13)
    with pytest.raises(ValueError, match=r"matrices must have shape \(n=3, S=2, S=2\)"):
        kernels.mixing_correction(trace, outputs, stochastic(3, 4, seed=0), 0)
    with pytest.raises(ValueError, match="dim must be a dim of the state"):
        kernels.mixing_correction(trace, outputs, stochastic(3, 2, seed=0), 2)


# -- norms -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, state", SHAPES, ids=str)
def test_residual_norms_kernel_matches_its_reference(n, state, dtype):
    """Squares summed per block in float32 (float64 for float64), blocks in float64: relative error of a few float32
    ulps for the reduced precisions, against the reference's float64 sums of the same rounded inputs."""
    trace, outputs = step(n, state, seed=n + 20, dtype=dtype)
    got, want = kernels.residual_norms(trace, outputs), kernels.residual_norms_reference(trace, outputs)
    tolerance = ulp_tolerance(torch.promote_types(dtype, torch.float32))
    for g, w in zip(got, want):
        assert g.dtype == torch.float64 and g.shape == (n,)
        torch.testing.assert_close(g, w, **tolerance)


def test_residual_norms_reference_is_the_drivers_definition():
    trace, outputs = step(5, (3, 4), seed=21)
    residual, output = kernels.residual_norms_reference(trace, outputs)
    torch.testing.assert_close(residual, (outputs - trace[1:]).flatten(1).norm(dim=1), rtol=1e-14, atol=0)
    torch.testing.assert_close(output, outputs.flatten(1).norm(dim=1), rtol=1e-14, atol=0)


# -- the driver on the kernel path -------------------------------------------------------------------------------

def _residual():
    params = residual_blocks(6, 8, seed=31, scales=[0.9, 0.8, 1.0, 0.95, 0.85, 0.9])
    params = {k: v.to(DEVICE) for k, v in params.items()}
    return ls.LayerSystem.from_function(residual_block, params, scales=params["a"]), randn(3, 8, seed=32)


def _mixing():
    params = {k: v.to(DEVICE) for k, v in residual_blocks(6, 8, seed=33, gain=0.05).items()}
    params["m"] = stochastic(6, 3, seed=34)

    def block(p, h):  # h: (S, D), streams mixed by M_l on dim 0
        return p["m"] @ h + p["gain"] * torch.tanh(h @ p["w"].T + p["c"])

    return ls.LayerSystem.from_function(block, params, mixing=params["m"], stream_dim=0), randn(3, 8, seed=35)


SOLVES = {  # strategy, damping, the launcher its step takes
    "identity": (_residual, ls.Identity(), 0.0, "correction"),
    "identity damped": (_residual, ls.Identity(), 0.3, "correction"),
    "scaled": (_residual, ls.Scaled(), 0.0, "correction"),
    "diagonal damped": (_residual, ls.Diagonal(probes=2), 0.2, "correction"),
    "mixing": (_mixing, ls.Mixing(), 0.0, "mixing_correction"),
    "mixing damped": (_mixing, ls.Mixing(), 0.5, "mixing_correction"),
}


@pytest.mark.parametrize("case", SOLVES)
@pytest.mark.parametrize("iters", [2, 6])
def test_solves_on_the_kernel_path_equal_the_torch_path(case, iters, monkeypatch):
    """Same trace and statistics (float64: to rounding) whether each step runs fused or in torch, for K < n and
    K = n, and the fused path is the one taken."""
    problem, jacobian, damping, launcher = SOLVES[case]
    system, h0 = problem()
    solver = ls.Newton(jacobian=jacobian, damping=damping)
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "use_triton", lambda *tensors: False)
        torch_path = ls.solve(system, h0, solver, iters=iters, final_residual=True)

    calls = []
    for name in (launcher, "residual_norms"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *args, _f=original, _n=name: calls.append(_n) or _f(*args))
    fused = ls.solve(system, h0, solver, iters=iters, final_residual=True)
    assert calls.count(launcher) == iters and calls.count("residual_norms") == iters + 1

    torch.testing.assert_close(fused.trace, torch_path.trace, rtol=1e-12, atol=1e-12)
    for field in ("residual", "contraction"):
        torch.testing.assert_close(getattr(fused.stats, field), getattr(torch_path.stats, field), rtol=1e-9,
                                   atol=1e-14, equal_nan=True)
    assert torch.equal(fused.stats.exact_prefix, torch_path.stats.exact_prefix)
    assert fused.result == torch_path.result
    if iters == 6:  # finite termination on the fused path too
        torch.testing.assert_close(fused.trace, system.sequential(h0), rtol=1e-10, atol=1e-10)


def test_sweep_and_per_token_matrices_keep_the_torch_path(monkeypatch):
    for name in ("correction", "mixing_correction"):
        monkeypatch.setattr(kernels, name, lambda *args: pytest.fail("a kernel for a Sweep or per-token map"))
    trace, outputs = step(3, (2, 4), seed=41)
    ls.IdentityMap().correct(trace, outputs, ls.Sweep())
    per_token = stochastic(3, 2, seed=1).unsqueeze(1).expand(3, 4, 2, 2)  # (n, D, S, S) on dim 0
    new, _ = ls.MatrixMap(per_token, 0).correct(trace, outputs)
    delta = ls.MatrixMap(per_token, 0).solve(outputs - trace[1:])
    torch.testing.assert_close(new[1:], trace[1:] + delta)
