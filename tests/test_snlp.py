"""SNLP over the models: exactness at K = n_par for every strategy and config, closed forms, fusion, plans."""

import dataclasses

import pytest
import torch

import layersolve as ls
from helpers import MODEL_CONFIGS, SEQ_LEN, random_model, skip_path_model, tiny_config, tokens
from models.inference import snlp


def strategies(cfg):
    out = {"zero": ls.Zero(), "identity": ls.Identity(), "scaled": ls.Scaled(), "diagonal": ls.Diagonal(probes=2)}
    if cfg.use_mhc:
        out["mixing"] = ls.Mixing()
    return out


@pytest.mark.parametrize("name", list(MODEL_CONFIGS) + ["mhc_dynamic"])
def test_k_equals_n_par_reproduces_the_sequential_logits(name):
    overrides = dict(use_mhc=True, mhc_num_streams=2, mhc_dynamic=True) if name == "mhc_dynamic" else MODEL_CONFIGS[name]
    cfg = tiny_config(**overrides)
    model = random_model(cfg, seed=4)
    idx = tokens(2, SEQ_LEN, seed=4)
    expected = model(idx)
    for label, jacobian in strategies(cfg).items():
        for n_par in (3, 6):
            out = snlp.forward(model, idx, snlp.Plan(n_par=n_par, jacobian=jacobian, iters=n_par))
            logits, stats = out.logits, out.stats
            torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10, msg=f"{label} n_par={n_par}")
            assert stats.iterations == n_par and stats.exact_prefix[-1] == n_par


def test_float32_exactness_to_1e_4():
    cfg = tiny_config(use_mhc=True, mhc_num_streams=2)
    model = random_model(cfg, seed=5, dtype=torch.float32)
    idx = tokens(2, 64, seed=5)
    for jacobian in (ls.Identity(), ls.Mixing()):
        logits = snlp.forward(model, idx, snlp.Plan(n_par=6, jacobian=jacobian, iters=6)).logits
        torch.testing.assert_close(logits, model(idx), rtol=1e-4, atol=1e-4)


def test_idn_k1_is_the_prefix_sum_of_branch_outputs():
    """IDN, repeat init, K = 1: h_l = h_init + sum_{j<=l} (f_j(h_init) - h_init), each f_j one block of the model
    applied to h_init on its own."""
    cfg = tiny_config()
    model = random_model(cfg, seed=6)
    idx = tokens(2, 40, seed=6)
    n_par, start = 4, 2
    logits = snlp.forward(model, idx, snlp.Plan(n_par=n_par, iters=1)).logits
    emb = model.embed(idx)
    trace = model.trace(emb, start)
    h_init = trace[-1]
    branches = [model.block(i, h_init, emb) - h_init for i in range(start, start + n_par)]
    trace += [h_init + sum(branches[:j + 1]) for j in range(n_par)]
    torch.testing.assert_close(logits, model.head(trace[-1], trace[model.backout_layer]), rtol=1e-12, atol=1e-12)


# Models whose blocks are exactly their skip paths (zero output projections), with the surrogate that claims to be
# that skip path's exact Jacobian: the identity without the blend; resid_l I with the x0 / resid blend (the skip
# path is resid_l h + x0_l x0); resid_l H_res_mlp H_res_attn on the stream axis with mHC. Dynamic mHC computes its
# matrices from h; `skip_path_model` zeroes dyn_proj, so they are the constants of their logits, the skip path is
# affine in h, and its Jacobian is exactly the mixing the system provides (otherwise the matrices' own derivatives,
# which HCN drops by design, would be part of it).
SKIP_PATHS = {
    "idn_without_blend": (dict(no_x0_resid=True), ls.Identity()),
    "scaled_without_blend": (dict(no_x0_resid=True), ls.Scaled()),
    "scaled_with_blend": (dict(), ls.Scaled()),
    "hcn_static_mhc": (dict(use_mhc=True, mhc_num_streams=3), ls.Mixing()),
    "hcn_static_mhc_without_blend": (dict(use_mhc=True, mhc_num_streams=2, no_x0_resid=True), ls.Mixing()),
    "hcn_dynamic_mhc": (dict(use_mhc=True, mhc_num_streams=2, mhc_dynamic=True), ls.Mixing()),
}


@pytest.mark.parametrize("name", SKIP_PATHS)
def test_the_skip_path_jacobian_is_exact_in_one_iteration(name):
    """Every block is affine, so one Newton iteration with its exact Jacobian lands on the trace from any guess:
    the surrogate that claims to be that Jacobian reproduces the sequential trace and logits at K = 1 < n_par.
    Jacobi (J~ = 0) does not."""
    overrides, jacobian = SKIP_PATHS[name]
    model = skip_path_model(tiny_config(**overrides), seed=14)
    idx = tokens(2, 40, seed=14)
    n_par, start = 4, 2
    emb = model.embed(idx)
    exact = torch.stack(model.trace(emb)[start:])  # (n_par + 1, *state)
    guess = ls.Given(exact + 0.1 * torch.randn(exact.shape, generator=torch.Generator().manual_seed(14),
                                               dtype=exact.dtype))  # off at every layer
    sol = ls.solve(model.layer_system(emb, start), exact[0], ls.Newton(jacobian), iters=1, init=guess)
    torch.testing.assert_close(sol.trace, exact, rtol=1e-12, atol=1e-12)
    plan = snlp.Plan(n_par=n_par, jacobian=jacobian, iters=1, init=guess)
    expected = model(idx)
    torch.testing.assert_close(snlp.forward(model, idx, plan).logits, expected, rtol=1e-12, atol=1e-12)
    jacobi = snlp.forward(model, idx, dataclasses.replace(plan, jacobian=ls.Zero())).logits
    assert (jacobi - expected).abs().max() > 1e-3


@pytest.mark.parametrize("fuse", [2, 3])
def test_fused_plans_converge_to_the_fused_model(fuse):
    cfg = tiny_config()
    model = random_model(cfg, seed=7)
    idx = tokens(2, SEQ_LEN, seed=7)
    plan = snlp.Plan(n_par=6, fuse=fuse, iters=6 // fuse)
    reference, trace = snlp.sequential_trace(model, idx, plan)
    assert trace.shape[0] == 6 // fuse + 1
    assert not torch.allclose(reference, model(idx))  # a fused model is a different function
    for jacobian in (ls.Identity(), ls.Scaled(), ls.Zero()):
        logits = snlp.forward(model, idx, snlp.Plan(n_par=6, fuse=fuse, iters=6 // fuse, jacobian=jacobian)).logits
        torch.testing.assert_close(logits, reference, rtol=1e-10, atol=1e-10)


def test_the_fused_backout_is_the_output_of_the_chunk_that_holds_the_backout_block():
    """The backout subtracts the output of block n_layer // 2; in a fused tail that block lies inside a chunk (not
    on its boundary here: block 3 of blocks 0..5 in chunks of 3), and the backout state is that chunk's output."""
    model = random_model(tiny_config(), seed=15)
    idx = tokens(2, 32, seed=15)
    L, n_par, fuse = 6, 6, 3
    start = L - n_par
    plan = snlp.Plan(n_par=n_par, fuse=fuse, iters=n_par // fuse)
    logits, trace = snlp.sequential_trace(model, idx, plan)
    chunks = [range(start + c * fuse, start + (c + 1) * fuse) for c in range(n_par // fuse)]
    holder = next(c for c, blocks in enumerate(chunks) if L // 2 in blocks)
    assert L // 2 != chunks[holder][-1]  # inside its chunk: floor and ceil of the chunk index differ
    expected = model.head(trace[-1], trace[holder + 1])  # trace[c + 1] is chunk c's output
    torch.testing.assert_close(logits, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(snlp.forward(model, idx, plan).logits, expected, rtol=1e-10, atol=1e-10)


def test_a_fused_chunk_sums_its_blocks_branches():
    """One fused chunk of two blocks: x + attn_1(n(x)) + attn_2(n(x)), then + mlp_1(n(.)) + mlp_2(n(.)), with
    x the averaged blend, each attention (the modules' own forward) with its own window and value embedding."""
    from models.nanochat.block import norm

    cfg = tiny_config(n_layer=2, window_pattern="SL")
    model = random_model(cfg, seed=8)
    emb = model.embed(tokens(1, SEQ_LEN, seed=8))
    h = torch.randn_like(emb.x0)
    fused = model.layer_system(emb, fuse=2).evaluate(slice(0, 1), h[None])[0]
    blocks, ctx = model.transformer.h, emb.context()
    x = model.resid_lambdas.mean() * h + model.x0_lambdas.mean() * emb.x0
    x = x + sum(block.attn(norm(x), ctx) for block in blocks)
    x = x + sum(block.mlp(norm(x)) for block in blocks)
    torch.testing.assert_close(fused, x, rtol=1e-12, atol=1e-12)


def test_preheat_is_a_better_guess_than_repeat():
    cfg = tiny_config()
    model = random_model(cfg, seed=9)
    plan = snlp.Plan(n_par=4, iters=1)
    calibration = [tokens(4, 64, seed=s) for s in range(3)]
    learned = snlp.fit_preheat(model, calibration, plan, rank=8)
    idx = tokens(2, 64, seed=99)
    expected = model(idx)
    repeat = snlp.forward(model, idx, plan).logits
    warm = snlp.forward(model, idx, snlp.Plan(n_par=4, iters=1, init=learned)).logits
    assert (warm - expected).norm() < (repeat - expected).norm()
    exact = snlp.forward(model, idx, snlp.Plan(n_par=4, iters=4, init=learned)).logits
    torch.testing.assert_close(exact, expected, rtol=1e-10, atol=1e-10)


def test_tolerance_and_stats():
    model = random_model(tiny_config(), seed=10)
    idx = tokens(2, 32, seed=10)
    _, trace = snlp.sequential_trace(model, idx, snlp.Plan(n_par=6))
    out = snlp.forward(model, idx, snlp.Plan(n_par=6, iters=None, tol=1e-9), reference=trace)
    logits, stats = out.logits, out.stats
    assert stats.final_residual() <= 1e-9 and stats.error[-1].max() <= 1e-8
    torch.testing.assert_close(logits, model(idx), rtol=1e-7, atol=1e-7)


def test_gradients_flow_through_the_snlp_forward():
    model = random_model(tiny_config(), seed=12, dtype=torch.float32).requires_grad_(True)
    logits = snlp.forward(model, tokens(1, 16, seed=12), snlp.Plan(n_par=4, iters=2)).logits
    logits.square().mean().backward()
    assert model.transformer.h[5].attn.c_q.weight.grad.abs().sum() > 0
    assert model.resid_lambdas.grad.abs().sum() > 0


class TestBadPlans:
    model = random_model(tiny_config(), seed=0)
    mhc = random_model(tiny_config(use_mhc=True, mhc_num_streams=2), seed=0)
    idx = tokens(1, 8)

    @pytest.mark.parametrize("n_par", [0, 7, -1])
    def test_n_par_outside_the_layers(self, n_par):
        with pytest.raises(ValueError, match=r"Plan.n_par must be an int in \[1, 6\]"):
            snlp.forward(self.model, self.idx, snlp.Plan(n_par=n_par))

    def test_fusion_width_must_divide_the_tail(self):
        with pytest.raises(ValueError, match="Plan.fuse=4 must be a positive int that divides n_par=6"):
            snlp.forward(self.model, self.idx, snlp.Plan(n_par=6, fuse=4))

    def test_fusion_of_mhc(self):
        with pytest.raises(ValueError, match="not defined for mHC"):
            snlp.forward(self.mhc, self.idx, snlp.Plan(n_par=4, fuse=2))

    def test_unknown_init_and_mixing_without_mhc(self):
        with pytest.raises(ValueError, match="Plan.init must be one of"):
            snlp.forward(self.model, self.idx, snlp.Plan(n_par=2, init="hot"))
        with pytest.raises(ValueError, match=r"the HCN surrogate \(ls.Mixing\) needs an mHC model"):  # before any work
            snlp.forward(self.model, self.idx, snlp.Plan(n_par=2, jacobian=ls.Mixing()))

    def test_divergence_raises_with_stats(self):
        wild = random_model(tiny_config(), seed=0, scale=3.0)
        with pytest.raises(ls.SolveError):
            snlp.forward(wild, self.idx, snlp.Plan(n_par=6, jacobian=ls.Diagonal(probes=1), iters=6))
        out = snlp.forward(wild, self.idx, snlp.Plan(n_par=6, jacobian=ls.Diagonal(probes=1), iters=6,
                                                               on_divergence="sequential"))
        logits, stats = out.logits, out.stats
        torch.testing.assert_close(logits, wild(self.idx), rtol=1e-10, atol=1e-10)
        assert stats.fallback_layers > 0


@pytest.mark.parametrize("init", ["repeat", "one_step", "given", "preheat"])
def test_every_initial_guess_keeps_finite_termination(init):
    model = random_model(tiny_config(), seed=13)
    idx = tokens(2, 48, seed=13)
    plan = snlp.Plan(n_par=4, iters=4)
    _, exact = snlp.sequential_trace(model, idx, plan)
    guesses = {"repeat": "repeat", "one_step": "one_step", "given": ls.Given(exact + 0.1 * torch.randn_like(exact)),
               "preheat": snlp.fit_preheat(model, [tokens(2, 48, seed=1)], plan, rank=4)}
    logits = snlp.forward(model, idx, snlp.Plan(n_par=4, iters=4, init=guesses[init])).logits
    torch.testing.assert_close(logits, model(idx), rtol=1e-10, atol=1e-10)
    exact_guess = snlp.forward(model, idx, snlp.Plan(n_par=4, iters=0, init=ls.Given(exact))).logits
    torch.testing.assert_close(exact_guess, model(idx), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fuse", [1, 2])
def test_evaluating_the_tail_in_groups_changes_nothing(monkeypatch, fuse):
    """On the CPU a large tail is evaluated a few units at a time (cache blocking); at K < n_par the logits, and the
    keys and values a decoding step writes, must be those of one batched evaluation."""
    from models.inference.decode import Decoder
    from models.nanochat import system

    model = random_model(tiny_config(), seed=5)
    idx = tokens(2, 20, seed=5)
    plan = snlp.Plan(n_par=4, fuse=fuse, iters=1)
    batched, decoder = snlp.forward(model, idx, plan).logits, Decoder(model, plan)
    decoder.step(idx)
    monkeypatch.setattr(system, "CPU_GROUP_BYTES", 1)  # one unit per call
    grouped, grouped_decoder = snlp.forward(model, idx, plan).logits, Decoder(model, plan)
    grouped_decoder.step(idx)
    torch.testing.assert_close(grouped, batched, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grouped_decoder.segment.k, decoder.segment.k, rtol=1e-12, atol=1e-12)


def test_under_no_grad_the_outputs_are_ordinary_tensors():
    """Under no_grad the layers run in inference mode, for its speed, but the caller gets ordinary tensors back
    (it can update them in place) with the numbers a forward with grad enabled gives, and so does a solve's error."""
    model, wild = random_model(tiny_config(), seed=13), random_model(tiny_config(), seed=0, scale=3.0)
    idx = tokens(1, 8, seed=13)
    plan = snlp.Plan(n_par=4, iters=2)
    with torch.no_grad():
        out, logits = snlp.forward(model, idx, plan), model(idx)
        with pytest.raises(ls.SolveError) as info:
            snlp.forward(wild, idx, snlp.Plan(n_par=6, jacobian=ls.Diagonal(probes=1), iters=6))
    torch.testing.assert_close(out.logits, snlp.forward(model, idx, plan).logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logits, model(idx), rtol=1e-12, atol=1e-12)
    for name, tensor in {"logits": out.logits, "stats": out.stats.residual, "model logits": logits,
                         "error's stats": info.value.stats.residual}.items():
        assert not tensor.is_inference(), name
        tensor.add_(0)  # in place, outside inference mode: refused for an inference tensor
