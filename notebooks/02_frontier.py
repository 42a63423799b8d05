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
# # 02 · The speed-quality frontier across plans
#
# An SNLP *plan* says how a forward runs: the last `n_par` blocks in parallel, `K` Newton iterations with a
# surrogate (IDN, Jacobi), optionally fused `F` blocks per chunk (`3xF2`: 3 chunks of 2 fused blocks), from an
# initial guess (`repeat`, `one_step`). Each plan trades quality (validation bits per byte, lower is better) for
# speed (wall time against the sequential forward). This notebook measures both for a grid of plans on the two
# tiny models of notebook 01 (the same config, so the cached runs are reused) and marks the Pareto front: the plans
# no other plan beats on both axes.

# %% tags=["parameters"]
n_layer = 6
n_embd = 64
steps = 30  # training steps of each model; a few hundred give a better model (and take minutes)
batch_size = 4
reg_lambda = 1.0
repeats = 5  # timed forwards per plan (the median counts)
seed = 0
cache_dir = None  # tokenizer, token streams and trained runs; None: the snlp command's cache ($SNLP_CACHE, ~/.cache/snlp)

# %%
# %matplotlib inline
import dataclasses

import torch

import analysis
import layersolve as ls
from models import snlp
from models.tools.bench import speedups
from models.tools.names import plan_name
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
models = {name: run.model().requires_grad_(False) for name, run in trained.items()}  # float32, as it would be served
for name, run in trained.items():
    status = "reused" if run.reused else "trained"
    print(f"{name:<16} {status}: validation {evaluate.describe(run.metrics['evals'][-1])}")

# %% [markdown]
# ## The plans
#
# A small grid over the plan's knobs. `plan_name` gives SNLP's names, e.g. `IDN n6 K2 repeat`.

# %%
half = n_layer // 2
plans = [snlp.Plan(n_par=n, jacobian=j, iters=k) for n in (half, n_layer) for j in (ls.Zero(), ls.Identity())
         for k in (1, 2)]
plans += [snlp.Plan(n_par=n_layer, iters=1, init="one_step"),  # initial guess: one step of every block
          snlp.Plan(n_par=n_layer, iters=1, fuse=2), snlp.Plan(n_par=n_layer, iters=2, fuse=2)]  # chunking
plans = {plan_name(p): p for p in plans}
print(list(plans))

# %% [markdown]
# ## Speed and quality
#
# Speed: `speedups` times the eager and the compiled sequential forward and every plan on one batch (median of
# `repeats` forwards after a warm-up); the speedup is the fastest sequential way's median over the plan's, so the
# eager forward itself may sit below 1.0x. Quality: `evaluate.plan_metrics` runs the plan over the validation set
# and reports bits per byte, with the worst solve result over its batches.

# %%
validation = data.validation(config)
idx, _ = next(iter(validation.batches()))  # (8, 64): the batch that is timed
points = []
for name, model in models.items():
    speed = speedups(model, idx, plans, warmup=1, repeats=repeats, progress=lambda line: None)["rows"]
    points.append(analysis.FrontierPoint("sequential", speed["sequential"]["speedup"],
                                         evaluate.sequential_metrics(model, validation)["bpb"], group=name))
    for plan_label, plan in plans.items():
        metrics = evaluate.plan_metrics(model, validation, plan)
        points.append(analysis.FrontierPoint(plan_label, speed[plan_label]["speedup"], metrics["quality"]["bpb"],
                                             group=name, ok=ls.Result[metrics["result"]].ok))
for point in points:
    print(f"{point.group:<16} {point.name:<24} {point.speedup:5.2f}x  {point.quality:.3f} bpb"
          f"{'' if point.ok else '  (solve failed)'}")

# %% [markdown]
# ## The Pareto front
#
# `analysis.pareto_front` keeps the ok plans that no other plan beats on both speed and quality; the plot draws
# every plan, each model's front as a line, and the fastest sequential way at 1.0x.

# %%
for name in models:
    front = analysis.pareto_front([p for p in points if p.group == name])
    print(f"{name}: " + ", ".join(f"{p.name} ({p.speedup:.2f}x, {p.quality:.3f})" for p in front))
analysis.plot_frontier(points, quality_label="validation bits per byte", title="speed against quality, per plan")

# %% [markdown]
# What to look for:
#
# - quality: on the baseline, few iterations cost Jacobi much more than IDN; the IDN-regularized model, trained for
#   one-iteration solves, loses almost nothing under any plan. An approximate forward is a slightly different
#   model, and on models this barely trained (30 steps) it can even score a hair better than the sequential one:
#   noise, not a gain;
# - timings of tiny forwards on a shared CPU are noisy (rerun, or raise `repeats`);
# - speed: on this toy model on a CPU, a parallel evaluation of several blocks costs about as much as running them,
#   so speedups stay near or below 1x; the shape of the trade-off is the point here. On a GPU, where the parallel
#   evaluation of n_par blocks costs little more than one, the same grid moves right (`snlp bench --preset
#   gpu-0.5b`);
# - fusion (`3xF2`) halves the units of the solve; its reference is the fused model, so its quality is that of a
#   slightly different model.
#
# To try: more `steps` in the parameter cell, a deeper model (more room between n_par and n_layer), or more plans.
