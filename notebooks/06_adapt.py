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
# # 06 · Adapting a model to its own parallel solve
#
# A model trained without SNLP in mind is accurate only where its layers barely move the state. `snlp plan` finds
# that segment; `snlp adapt` then trains the segment alone, with the original model frozen as the teacher, so that
# the segment solved in parallel gives the original's predictions (docs/adapt.md). This notebook does both on the
# tiny unregularized model of notebook 01 (the same cached run): the update profile, the plan search, a short
# adaptation, and the frontier before and after. Trained for seconds, that model is nearly exact under IDN
# already (the search below shows it), so the adaptation here targets Jacobi (J~ = 0), the crudest surrogate,
# where it has something to do; SmolLM2 below is the real case, under IDN.

# %% tags=["parameters"]
n_layer = 6
n_embd = 64
steps = 30  # training steps of the model (notebook 01's baseline, reused from the cache)
batch_size = 4
seed = 0
adapt_steps = 20  # adaptation steps; a few hundred go further
segment = (1, 6)  # the segment adapted: blocks start .. stop - 1 (0-based)
cache_dir = None  # None: the snlp command's cache ($SNLP_CACHE, ~/.cache/snlp)

# %%
# %matplotlib inline
import dataclasses
import tempfile

import torch
from matplotlib.figure import Figure

import analysis
import layersolve as ls
from models import snlp
from models.tools import planner
from models.training import adapt, evaluate
from models.training.config import PRESETS
from models.training.loop import Data
from models.training.regularizer import Regularizer
from models.training.runs import default_cache, pair, trained_runs

torch.manual_seed(seed)
quick = PRESETS["quick"]  # notebook 01's config: its baseline run is reused
config = dataclasses.replace(quick, steps=steps, batch_size=batch_size, seed=seed,
                             model=dataclasses.replace(quick.model, n_layer=n_layer, n_embd=n_embd))
cache_dir = cache_dir or default_cache()
data = Data.prepare(None, config.model.vocab_size, cache_dir)
trained = trained_runs(pair(config, Regularizer(ls.Identity(), (n_layer // 2,)), 1.0), data, cache_dir,
                       show_progress=False)
model = trained["baseline"].model().requires_grad_(False)  # float32, as it would be served
val = evaluate.Validation(data.val, data.tokenizer.token_bytes(), 8, config.model.sequence_len, 2048)
print(f"baseline: {n_layer} layers, validation {evaluate.describe(trained['baseline'].metrics['evals'][-1])}")

# %% [markdown]
# ## Where the model moves its state, and which segment to solve
#
# The relative update ||h_l - h_(l-1)|| / ||h_(l-1)|| per block, then `snlp plan`'s search: candidate segments of
# each length (the tail and the windows of least update), each at K = 1 and 2, ranked by their PPL gap.

# %%
search = planner.search(model, val, planner.Search((2, 3), {"IDN": ls.Identity()}), budget=0.03, repeats=1,
                        progress=lambda _: None)
print(planner.table(search))
analysis.plot_update_profile(search["profile"], (segment[0], segment[1]), "baseline: per-block relative update")

# %% [markdown]
# ## A short adaptation
#
# Only blocks `segment` train; the teacher is the model itself, frozen. The objective: the KL of the parallel
# solve's logits to the original's, the KL of the adapted model's own sequential logits to the original's, and the
# SNLP regularizer on the segment's states.

# %%
plan = snlp.Plan(n_par=segment[1] - segment[0], iters=1, start=segment[0], jacobian=ls.Zero())  # Jacobi K = 1
cfg = adapt.AdaptConfig(plan, steps=adapt_steps, batch_size=4, seq_len=config.model.sequence_len, lr=1e-3,
                        save_every=adapt_steps)
adapted, metrics = adapt.adapt(model, data.train, cfg, tempfile.mkdtemp(), show_progress=False)
fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
ax = fig.subplots()
for key in ("kl_parallel", "kl_sequential", "gap"):
    ax.plot([r["step"] for r in metrics["train"]], [r[key] for r in metrics["train"]], label=key)
ax.set(xlabel="adaptation step", ylabel="objective term", yscale="log", title="the objective's terms")
ax.legend()
fig

# %% [markdown]
# ## The frontier before and after
#
# Jacobi over segments of 3 and 5 blocks, at K = 1 and 2: the KL of each plan's predictions to the original's
# sequential ones on held-out text, before and after adaptation (at this size the PPL hardly moves; the KL shows
# the change).

# %%
plans = {f"{s}-{s + n - 1} K{k}": snlp.Plan(n_par=n, iters=k, start=s, jacobian=ls.Zero())
         for n in (3, 5) for s in range(0, n_layer - n + 1) for k in (1, 2)}
base = evaluate.plan_metrics(model, val, None)["quality"]["ppl"]
kls = {label: {name: evaluate.plan_metrics(m, val, p, reference=model)["kl"] for name, p in plans.items()}
       for label, m in (("original", model), ("adapted", adapted))}
fig = Figure(figsize=(8, 5), dpi=100, layout="constrained")
ax = fig.subplots()
for label, row in kls.items():
    ax.plot(list(row), list(row.values()), marker="o", label=label)
ax.set(xlabel="segment (blocks) and K", ylabel="KL(original || plan), nats per token", yscale="log",
       title=f"Jacobi plans; the model adapted over blocks {segment[0]}-{segment[1] - 1} at K = 1")
ax.tick_params(axis="x", rotation=60)
ax.legend()
print(f"sequential PPL: original {base:.2f}, adapted "
      f"{evaluate.plan_metrics(adapted, val, None)['quality']['ppl']:.2f}")
fig

# %% [markdown]
# On SmolLM2-135M, the same command over 8 and 12 of its 30 layers:
# [benchmarks/results/cpu-adapt-smollm2.md](../benchmarks/results/cpu-adapt-smollm2.md) (`python
# benchmarks/adapt_smollm2.py`).
