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
# # 04 · Your own model in layersolve
#
# layersolve solves the *trace* of a layered computation, h_l = f_l(h_{l-1}) for l = 1..L, as one nonlinear
# system, all layers at once, instead of running the layers one after another. This notebook plugs in models that
# are not the repository's GPT:
#
# 1. three ways to describe a stack of layers as an `ls.LayerSystem`: a list of `nn.Module` blocks, a pure
#    function with parameters stacked over layers, and a hand-written `evaluate`;
# 2. a recurrence over *time* (a GRU cell over 100 steps) as a layer system whose "layers" are time steps, solved
#    with the same solvers (this is DEER / quasi-DEER, parallel-in-time RNN evaluation).
#
# Everything is float64: at the fixed point the solves reproduce the sequential computation to rounding.

# %% tags=["parameters"]
layers = 12  # depth of the block stacks in part 1
width = 16  # their state width
steps = 100  # time steps of the GRU in part 2
hidden = 8  # GRU state size
batch = 4  # sequences in the GRU batch
seed = 0

# %%
# %matplotlib inline
import torch
from matplotlib.figure import Figure

import analysis
import layersolve as ls

torch.manual_seed(seed)
torch.set_grad_enabled(False)  # we only evaluate: no autograd graphs (JVPs are forward-mode and still work)
torch.set_default_dtype(torch.float64)

# %% [markdown]
# ## 1. Three ways to build a layer system
#
# **A stack of modules.** Any list of modules with one structure (same parameter names and shapes) works:
# `from_modules` stacks their parameters once and evaluates all layers in one `torch.func.vmap` call.


# %%
class Block(torch.nn.Module):
    """A residual block h -> h + 0.1 tanh(W h + c)."""

    def __init__(self, width):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)

    def forward(self, h):
        return h + 0.1 * torch.tanh(self.lin(h))


blocks = [Block(width) for _ in range(layers)]
by_modules = ls.LayerSystem.from_modules(blocks)
h0 = torch.randn(batch, width)  # any state shape; here (batch, width)
exact = by_modules.sequential(h0)  # (layers + 1, batch, width): h_0 .. h_L, one layer after another
print(by_modules, tuple(exact.shape))

# %% [markdown]
# **A pure function with stacked parameters.** `from_function(fn, params)` means f_l(h) = fn(params[l], h), where
# `params` is a tensor, or a dict / tuple of tensors, stacked on dim 0 over the layers. Here the same blocks'
# weights, stacked by hand:

# %%
params = {"w": torch.stack([b.lin.weight.detach() for b in blocks]),  # (layers, width, width)
          "c": torch.stack([b.lin.bias.detach() for b in blocks])}  # (layers, width)


def block_fn(p, h):  # p: one layer's parameters; h: (batch, width)
    return h + 0.1 * torch.tanh(h @ p["w"].T + p["c"])


by_function = ls.LayerSystem.from_function(block_fn, params)

# %% [markdown]
# **A custom `evaluate`.** The general form: `evaluate(layers, inputs)` gets a slice of layers and one input state
# per layer, stacked, and returns the layers' outputs in one batched call. This is the one thing a system must
# do; write it yourself when your layers are not a vmappable function (a fused kernel, layers of different
# shapes behind padding, an external simulator).


# %%
def evaluate(layer_slice: slice, inputs: torch.Tensor) -> torch.Tensor:  # inputs: (n, batch, width)
    w, c = params["w"][layer_slice], params["c"][layer_slice]  # (n, width, width), (n, width)
    return inputs + 0.1 * torch.tanh(inputs @ w.transpose(1, 2) + c[:, None, :])


by_callable = ls.LayerSystem(evaluate, num_layers=layers, state_shape=(None, width), dtype=torch.float64)

# %% [markdown]
# All three describe the same system, so the same solve gives the same trace. The default solver is Newton with
# the identity as its surrogate Jacobian (IDN), which fits residual blocks h + g(h): their Jacobian is I plus a
# small correction.

# %%
runs = {}
for name, system in {"from_modules": by_modules, "from_function": by_function, "LayerSystem": by_callable}.items():
    sol = ls.solve(system, h0, tol=1e-12, reference=exact)
    runs[name] = sol.stats
    print(f"{name:<14} {sol.result.name:<10} {sol.stats.iterations} iterations, "
          f"max error {float((sol.trace - exact).abs().max()):.1e}")
print(runs["LayerSystem"].summary())

# %% [markdown]
# `summary()` lists, per iterate, the largest residual ||h_l - f_l(h_{l-1})|| / ||f_l(h_{l-1})|| over layers and
# the *exact prefix*: how many leading layers are already exact to rounding. A handful of parallel iterations
# replace twelve sequential layers. Optional structure, passed as keywords to any constructor, feeds the
# structured surrogates: `scales=` for `ls.Scaled()`, `mixing=` / `stream_dim=` for `ls.Mixing()`, `jvp=` for a
# hand-written Jacobian-vector product (see docs/api.md).
#
# ## 2. A recurrence over time: a GRU as a layer system
#
# A recurrent network h_t = cell(x_t, h_{t-1}) is the same equation with time steps for layers: f_t(h) =
# cell(x_t, h), one shared cell, a different input x_t per step. Solving the trace for all t at once is
# parallel-in-time evaluation of the RNN (DEER, Lim et al. 2024; quasi-DEER, Gonzalez et al. 2024).

# %%
cell = torch.nn.GRUCell(3, hidden)
x = torch.randn(steps, batch, 3)  # (time, batch, features): the input sequence


def gru_steps(step_slice: slice, states: torch.Tensor) -> torch.Tensor:  # states: (n, batch, hidden)
    n = states.shape[0]
    out = cell(x[step_slice].reshape(n * batch, 3), states.reshape(n * batch, hidden))  # n steps as one batch
    return out.reshape(n, batch, hidden)


gru = ls.LayerSystem(gru_steps, num_layers=steps, state_shape=(batch, hidden), dtype=torch.float64)
start = torch.zeros(batch, hidden)  # h_0
sequential = gru.sequential(start)  # (steps + 1, batch, hidden): the recurrence, one step after another

# %% [markdown]
# The sequential trace is the GRU itself: `torch.nn.GRU` with the cell's weights gives the same states.

# %%
rnn = torch.nn.GRU(3, hidden)
rnn.load_state_dict({f"{name}_l0": value for name, value in cell.state_dict().items()})
outputs, _ = rnn(x, start[None])  # (steps, batch, hidden)
print("largest difference to torch.nn.GRU:", float((outputs - sequential[1:]).abs().max()))

# %% [markdown]
# Now solve it in parallel with the solvers of part 1, to a tolerance of 1e-10 on the relative residual:
#
# - **Jacobi** (surrogate J~ = 0): re-evaluate every step from the previous iterate;
# - **IDN** (J~ = I): the residual-network surrogate;
# - **quasi-DEER** (`ls.Diagonal()`, the exact diagonal of each step's Jacobian, from JVPs);
# - **DEER** (`ls.Exact(method=ls.Dense())`): exact Newton, the Jacobians materialized and the linear recurrence
#   solved by a parallel matrix scan;
# - **exact Newton by sweep** (`ls.Exact()`): the same Newton steps, its recurrence solved one JVP per step.

# %%
solvers = {
    "Jacobi": ls.Jacobi(),
    "IDN": ls.Newton(jacobian=ls.Identity()),
    "quasi-DEER (Diagonal)": ls.Newton(jacobian=ls.Diagonal()),
    "DEER (Exact, Dense)": ls.Newton(jacobian=ls.Exact(method=ls.Dense())),
    "Exact (Sweep)": ls.Newton(jacobian=ls.Exact()),
}
rnn_runs = {}
print(f"{'solver':<22} {'result':<10} {'iters':>5} {'depth':>5} {'JVPs':>6} {'max error':>9}")
for name, solver in solvers.items():
    sol = ls.solve(gru, start, solver, tol=1e-10, reference=sequential, throw=False)
    rnn_runs[name] = sol.stats
    s = sol.stats
    print(f"{name:<22} {sol.result.name:<10} {s.iterations:>5} {s.depth:>5} {s.jvps:>6} "
          f"{float(s.error[-1].max()):9.1e}")

# %% [markdown]
# What to read in the table (the sequential recurrence has depth `steps` = 100):
#
# - every solver that converges lands on the sequential trace to ~1e-10 or better;
# - **depth** counts evaluation steps on the critical path (a parallel call over all steps counts one). DEER
#   needs a handful of Newton iterations, each a parallel evaluation, a parallel JVP and a log-depth scan;
# - exact Newton *by sweep* takes as few iterations as DEER but its depth is several times the sequential
#   recurrence's: the sweep is sequential, so it buys nothing in parallel time. How the linear recurrence is
#   solved matters as much as the surrogate;
# - IDN **diverges**: a GRU step h -> (1 - z) n + z h is a gated *convex blend*, not a residual block h + g(h). Its
#   Jacobian is near diag(z), far from I, so the identity surrogate overshoots every step. Jacobi's surrogate 0 is
#   closer, and the diagonal surrogate (quasi-DEER) closer still. Pick the surrogate that matches the update.
#
# The error curves (largest relative error over time steps, against iteration; IDN's stops where it diverged):

# %%
analysis.plot_convergence(rnn_runs, "error", title=f"GRU over {steps} steps: error against the sequential trace")

# %% [markdown]
# Finite termination made visible. The picture shows each step's error (colour, log scale) per Jacobi iterate.
# The dark triangle is exact to the last bit: Jacobi fixes exactly one more step per iteration (step t is exact
# once step t - 1 is; dashed line). Above it the rest of the trace still converges, everywhere at once, because the
# GRU's gates damp an error in h_{t-1}. Once those errors fall below sqrt(eps), the exact prefix (solid line: steps
# whose residual is within sqrt(eps)) leaves the diagonal, and the solve stops well before 100 iterations.

# %%
jacobi = rnn_runs["Jacobi"]
fig = Figure(figsize=(7, 3.5))
ax = fig.subplots()
image = ax.imshow(jacobi.error.clamp_min(1e-16).log10(), aspect="auto", origin="lower", cmap="viridis")
ax.plot(jacobi.exact_prefix, torch.arange(len(jacobi.exact_prefix)), color="w", lw=1, label="exact prefix")
ax.plot(torch.arange(len(jacobi.exact_prefix)), torch.arange(len(jacobi.exact_prefix)), "w--", lw=1,
        label="guaranteed (k steps)")
ax.set_xlim(0, steps - 1)
ax.set_xlabel("time step t")
ax.set_ylabel("Jacobi iterate k")
ax.legend(loc="lower right", fontsize=8)
fig.colorbar(image, ax=ax, label="log10 relative error")
fig.tight_layout()
fig

# %% [markdown]
# To try: raise `steps` to 1000 in the parameter cell (DEER's iteration count barely moves while the sequential
# depth grows tenfold), or replace the GRU with your own cell: anything that maps (input_t, h) -> h works.
