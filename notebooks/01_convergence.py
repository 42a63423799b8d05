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
# # 01 · Convergence of every strategy on a trained model
#
# SNLP solves a model's layer trace h_l = f_l(h_{l-1}) in parallel over depth with Newton iterations whose Jacobian
# is replaced by a cheap surrogate. This notebook trains two tiny nanochat models on the embedded Shakespeare
# corpus with the same seed and tokens, a **baseline** and one trained with the **IDN regularizer** (which asks one
# identity-Newton iteration over the last layers to land near the sequential trace), and watches every strategy
# converge on both:
#
# - error and residual against iteration, the largest over layers and per layer;
# - the layer x iteration heatmap;
# - the exact-prefix front, finite termination made visible;
# - Jacobi's instability.
#
# Both runs are cached (keyed by config, data and code version) in `cache_dir`, so re-running is fast.

# %% tags=["parameters"]
n_layer = 6
n_embd = 64
steps = 30  # training steps of each model; a few hundred give a better model (and take minutes)
batch_size = 4
reg_lambda = 1.0
tol = 1e-10  # every solve runs (in float64) to this relative residual, or to finite termination
seed = 0
cache_dir = None  # tokenizer, token streams and trained runs; None: the snlp command's cache ($SNLP_CACHE, ~/.cache/snlp)

# %%
# %matplotlib inline
import dataclasses

import torch

import analysis
import layersolve as ls
from models import snlp
from models.training import evaluate
from models.training.config import PRESETS
from models.training.loop import Data
from models.training.regularizer import Regularizer
from models.training.runs import default_cache, pair, trained_runs

torch.manual_seed(seed)
quick = PRESETS["quick"]  # the demo's toy size, shrunk by the parameters above
config = dataclasses.replace(quick, steps=steps, batch_size=batch_size, seed=seed,
                             model=dataclasses.replace(quick.model, n_layer=n_layer, n_embd=n_embd))
cache_dir = cache_dir or default_cache()  # one place, whichever folder the notebook runs from
data = Data.prepare(None, config.model.vocab_size, cache_dir)  # the embedded corpus, its BPE tokenizer
trained = trained_runs(pair(config, Regularizer(ls.Identity(), (n_layer // 2,)), reg_lambda), data, cache_dir,
                    show_progress=False)
models = {name: run.model().double().requires_grad_(False) for name, run in trained.items()}  # float64: exact maths
for name, run in trained.items():
    status = "reused" if run.reused else "trained"
    print(f"{name:<16} {status}: validation {evaluate.describe(run.metrics['evals'][-1])}")

# %% [markdown]
# ## Every strategy, both models
#
# One validation batch; every block is in the parallel tail (`n_par = n_layer`). Each solve records its error
# against the exact sequential trace and its residual ||h_l - f_l(h_{l-1})|| / ||f_l(h_{l-1})|| per iterate.

# %%
x, _ = next(iter(data.validation(config, batch_size=2).batches()))  # (2, 64) token ids
strategies = {"Jacobi": ls.Zero(), "IDN": ls.Identity(), "Scaled": ls.Scaled(),
              "Diagonal (4 probes)": ls.Diagonal(probes=4), "Exact": ls.Exact()}
runs = {}
for name, model in models.items():
    _, reference = snlp.sequential_trace(model, x, snlp.Plan(n_par=n_layer))  # (L+1, B, T, D)
    for label, jacobian in strategies.items():
        plan = snlp.Plan(n_par=n_layer, jacobian=jacobian, iters=None, tol=tol)
        runs[f"{name}: {label}"] = snlp.forward(model, x, plan, throw=False, reference=reference).stats
print(analysis.convergence_table(runs, "error"))

# %% [markdown]
# Every solve ends exact by iteration `n_layer` at the latest (finite termination). Look at how fast each gets
# there: exact Newton converges quadratically in a few iterations; the identity-based surrogates (IDN, Scaled) come
# next, linearly, and on the regularized model, trained for exactly that, their error falls faster after the first
# iterations (compare the columns k = 3 .. 5); Jacobi is slowest, its error barely moves before the front arrives.
# (At the default 30 training steps both models are barely trained; more `steps` widen the gap.)

# %%
analysis.plot_convergence(runs, "error", title="error against the sequential trace (max over layers)")

# %%
analysis.plot_convergence(runs, "residual", title="relative residual (max over layers)")

# %% [markdown]
# ## Per layer
#
# The largest error over layers hides where in depth it sits. Left: one line per layer (darker is deeper); right:
# the last iterate's error per layer. For IDN on the baseline, the early layers settle first and the error
# concentrates in the deepest layers, which inherit every mismatch upstream.

# %%
analysis.plot_layer_convergence(runs["baseline: IDN"], "error", title="baseline, IDN: error per layer")

# %% [markdown]
# The same record as a picture: log10 residual per layer (x) and iteration (y). Read it by rows: each Newton step
# darkens the whole row at once (parallel over depth), and the boundary of the exact region moves right by at
# least one layer per row.

# %%
analysis.plot_heatmap(runs["baseline: IDN"], "residual", title="baseline, IDN: residual, layer x iteration")

# %% [markdown]
# ## The exact-prefix front
#
# After k iterations, at least the first k layers are exact, whatever the surrogate: layer 1's input is the
# embedding, which is exact from the start, and each iteration makes one more layer's input exact. The dashed
# diagonal is that guarantee; a strategy above it is gaining layers by convergence, not only by the front.

# %%
analysis.plot_prefix_front({k: v for k, v in runs.items() if k.startswith("baseline")},
                           title="baseline: exact prefix against iterations")

# %% [markdown]
# ## Jacobi's instability
#
# Jacobi (J~ = 0) re-evaluates every layer at the previous iterate: h_l <- f_l(h_{l-1}). It needs no surrogate at
# all, but the error it leaves is the whole Jacobian J_l, whose norm in a residual network is about 1 (the skip
# path), so nothing damps it: the error of the layers beyond the front does not shrink, and it can grow, until the
# front reaches them. Its per-layer picture shows the staircase: each layer is fixed only when the front arrives.

# %%
analysis.plot_layer_convergence(runs["baseline: Jacobi"], "error", title="baseline, Jacobi: error per layer")

# %% [markdown]
# To try: more `steps` (a better-trained model makes the contrast between the two models sharper), a deeper model,
# or `reg_lambda = 0.1`.
