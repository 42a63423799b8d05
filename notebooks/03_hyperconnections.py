# ---
# jupyter:
#   jupytext:
#     notebook_metadata_filter: -jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Hyper-connections: why HCN beats IDN on mHC models
#
# A model with manifold-constrained hyper-connections (mHC) carries S residual *streams* instead of one. Each block
# mixes them with doubly stochastic matrices H_res before and after its attention and MLP, so the block's skip path
# is not the identity but
#
#     h -> resid_l · H_res_mlp,l · H_res_attn,l · h        (a matrix M_l on the stream axis)
#
# and the block is f_l(h) = M_l h + branches(h). The Newton step over depth needs a surrogate J~_l of the block's
# Jacobian J_l. IDN takes J~_l = I; HCN (`ls.Mixing()`, SNLP's hyper-connection Newton) takes J~_l = M_l, the skip
# path exactly. The error a surrogate leaves, J_l - J~_l, is what every Newton step propagates, so:
#
# - on **static** mHC (M_l fixed per layer), HCN leaves only the branches' Jacobian; IDN leaves M_l - I as well;
# - on **dynamic** mHC (M_l computed from the state, per token), HCN takes M_l at the iterate as a constant and drops
#   its derivative with respect to h, so its mismatch grows.
#
# We measure both: iterations to a tolerance for each strategy against exact Newton (the reference that needs the
# fewest iterations, at a price in JVPs), and the per-layer surrogate error ||J_l - J~_l||_2 estimated by power
# iteration on JVPs (`ls.surrogate_error`).
#
# **Trained weights are not needed here.** The question is how well each surrogate matches the Jacobian's
# structure, and that structure (the stream mixing) is in the architecture. We use random "trained-like" weights:
# `init_weights(seed=0, output_std=0.02)` draws the blocks' output projections from N(0, 0.02), as the benchmark
# suite does, so the branches are not zero. One change to nanochat's initialization: there, H_res starts at almost
# exactly I (its logits favour the diagonal by 0.5, divided by the Sinkhorn temperature 0.05), which a trained model
# moves away from; we draw the logits at random on the temperature's scale, so the streams really mix.

# %% tags=["parameters"]
n_layer = 8
n_embd = 32
streams = 4  # mHC residual streams S
tokens = 16  # sequence length T
mixing_std = 0.05  # std of the random H_res logits; None keeps nanochat's near-identity initialization
tol = 1e-8  # relative residual every solve runs to
power_iters = 10  # power iterations per surrogate-error estimate
seed = 0

# %%
# %matplotlib inline
import torch

import analysis
import layersolve as ls
from models import nanochat, snlp

torch.manual_seed(seed)  # dynamic mHC's projections keep torch's default initialization, drawn from this seed


def mhc_model(dynamic: bool) -> nanochat.GPT:
    """A float64 mHC model with trained-like random weights; nothing of it is differentiated."""
    config = nanochat.GPTConfig(sequence_len=64, vocab_size=256, n_layer=n_layer, n_head=2, n_kv_head=2,
                                n_embd=n_embd, use_mhc=True, mhc_num_streams=streams, mhc_dynamic=dynamic)
    model = nanochat.GPT(config)
    model.init_weights(seed=seed, output_std=0.02)
    if mixing_std is not None:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for block in model.transformer.h:
                for hc in (block.hc_attn, block.hc_mlp):
                    hc.H_res_logits.copy_(mixing_std * torch.randn(streams, streams, generator=g))
    return model.double().eval().requires_grad_(False)


models = {"static mHC": mhc_model(dynamic=False), "dynamic mHC": mhc_model(dynamic=True)}
idx = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(seed))  # (B, T) token ids

# %% [markdown]
# ## The model as a layer system
#
# `snlp.prepare` runs the blocks before the parallel tail (none here: `n_par = n_layer` solves every block) and
# returns the tail's `BlockSystem`. Its state is (B, S, T, D); with static mHC it carries one mixing matrix M_l per
# layer, the matrices `ls.Mixing()` uses. Here is the first layer's: far from the identity.

# %%
whole = snlp.Plan(n_par=n_layer)
tails = {name: snlp.prepare(model, model.embed(idx), whole) for name, model in models.items()}
references = {name: tail.system.sequential(tail.prefix[-1]) for name, tail in tails.items()}  # (L+1, B, S, T, D)
print("state shape", tuple(references["static mHC"].shape[1:]))
print("M_1 =\n", tails["static mHC"].system.mixing[0].numpy().round(2))

# %% [markdown]
# ## Iterations to a tolerance
#
# Every strategy solves all `n_layer` blocks to a relative residual of `tol`. Jacobi (J~ = 0) is the floor: it
# gains exactly one exact layer per iteration. Exact Newton (J~ = J, through JVPs) is the reference: quadratic
# convergence, the fewest iterations; by sweep its recurrence costs one JVP per layer in sequence, by GMRES many
# JVPs in parallel.

# %%
strategies = {
    "Jacobi": ls.Zero(),
    "IDN": ls.Identity(),
    "HCN": ls.Mixing(),
    "Exact (Sweep)": ls.Exact(method=ls.Sweep()),
    "Exact (GMRES)": ls.Exact(method=ls.GMRES()),
}
runs = {name: {} for name in models}
print(f"{'model':<12} {'strategy':<14} {'result':<10} {'iters':>5} {'JVPs':>5} {'depth':>5}")
for name, model in models.items():
    for label, jacobian in strategies.items():
        plan = snlp.Plan(n_par=n_layer, jacobian=jacobian, iters=None, tol=tol)
        out = snlp.forward(model, idx, plan, throw=False, reference=references[name])
        runs[name][label] = s = out.stats
        print(f"{name:<12} {label:<14} {out.result.name:<10} {s.iterations:>5} {s.jvps:>5} {s.depth:>5}")

# %% [markdown]
# Read the table per model (sequential evaluation has depth `n_layer`):
#
# - on static mHC, HCN needs half of IDN's iterations, close to exact Newton's, with no JVPs at all;
# - IDN needs as many iterations as Jacobi: its error falls, but reaches `tol` only at k = `n_layer`, where finite
#   termination makes every solve exact anyway. The mixing it ignores is as large as the Jacobian itself;
# - on dynamic mHC, HCN still wins, by less;
# - exact Newton by sweep needs the fewest iterations but its depth exceeds the sequential model's: each iteration
#   sweeps one JVP per layer in sequence. GMRES does the same Newton steps with many more (parallel) JVPs.
#
# The curves show the rates: each line is the largest relative error over layers against the exact trace (the two
# exact Newton lines coincide: they take the same steps).

# %%
analysis.plot_convergence(runs["static mHC"], "error", title="static mHC: error against the sequential trace")

# %%
analysis.plot_convergence(runs["dynamic mHC"], "error", title="dynamic mHC: error against the sequential trace")

# %% [markdown]
# ## Why: the surrogate error per layer
#
# `ls.surrogate_error(system, trace, jacobian)` estimates ||J_l - J~_l||_2 at the exact trace's inputs by power
# iteration on E^T E, E = J - J~ (one batched JVP forward and one reverse pass per iteration, all layers at once).
# With `relative=True` it divides by ||J_l||_2, so Jacobi's (J~ = 0) is exactly 1 and a bar near 1 means the
# surrogate is no better than none. Below 1 the error a Newton step passes on shrinks.

# %%
errors = {}
for name, tail in tails.items():
    found = analysis.surrogate_errors(tail.system, references[name], {"IDN": ls.Identity(), "HCN": ls.Mixing()},
                                      iters=power_iters, seed=seed, relative=True)
    errors.update({f"{name}: {label}": e for label, e in found.items()})
analysis.plot_surrogate_error(errors, relative=True, title="relative surrogate error ||J - J~|| / ||J|| per layer")

# %% [markdown]
# What the bars say:
#
# - **IDN** sits near 1 on both models: I is as far from resid_l M_l (a genuine mixing of streams) as 0 is;
# - **HCN on static mHC** is small (the blocks' branches, with output projections of std 0.02): its Newton step
#   removes most of the error at every layer, which is why it converges nearly like exact Newton;
# - **HCN on dynamic mHC** is several times larger: the mixing depends on the state, and the derivative of M_l(h) h
#   with respect to h has a term (dM_l/dh) h that a constant matrix cannot match.
#
# The structured surrogate works exactly where the structure it copies is the Jacobian's dominant part. Try
# `mixing_std = None` (nanochat's initialization, M_l ~ resid_l I): HCN and `ls.Scaled()` then coincide, and IDN
# is off only by the scale resid_l.
