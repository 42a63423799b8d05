"""SNLP-aware regularization (SNLP, arXiv 2605.17842, the section on training; docs/math.md): train the model so
that one surrogate Newton iteration over its last n layers lands close to the sequential trace.

For each n in `n_par_configs`, from the sequential state h_{L-n},

    loss += sum over compared layers l of mean_tokens( ||h~_l - h_l|| / max(||h_l||, 1e-6) )

(relative L2 over the feature dim, not squared; the target h_l is the sequential trace, optionally detached). The
trainer multiplies the sum by lambda and a linear warm-up w(t). What h~ is and where it is compared follows the
published code's `idn_stride`:

- stride >= 1: h~ is layersolve's one-iteration solve of the tail from repeat with the chosen surrogate (IDN:
  J~ = I; Scaled: the resid lambdas; HCN: the mHC mixing; Diagonal: Hutchinson), compared at the tail's layers
  j = 1 .. n-1 (0-based) with (j + 1) % stride == 0 and at its last. Layer j = 0 is exact after one iteration
  (finite termination) and never compared. A stride >= n compares the corrected last state alone, the form of the
  published HCN recipe (stride 0 there) and of its Diagonal regularizer.
- stride = 0: the published default (its 3B IDN recipe): the last block alone on the tail's start,
  h~_L = f_L(h_{L-n}), against h_L, with no prefix correction. This is the Jacobi (J~ = 0) iterate's last layer,
  so it takes no surrogate, and it costs one block per config instead of n.

Modes: "all" evaluates every config every step (the published recipe); "sample" draws one config per step (seeded
by the step); "batched" evaluates every config's blocks in one batched call (the same work as "all" in fewer,
larger kernels) and serves those evaluations to the solver.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

import layersolve as ls

from ..nanochat.gpt import GPT, Embedded
from ..nanochat.block import Context, at_least_float32, block_forward, cat_weights

MODES = ("all", "sample", "batched")


@dataclass(frozen=True)
class Regularizer:
    jacobian: ls.Jacobian = field(default_factory=ls.Identity)
    n_par_configs: tuple[int, ...] = (8, 16, 24)
    stride: int = 1  # >= 1: every stride-th corrected tail layer and the last; 0: the last block alone (published)
    detach_target: bool = False
    mode: str = "all"

    def check(self, model: GPT) -> None:
        L = model.config.n_layer
        if not self.n_par_configs or any(not 1 <= n <= L for n in self.n_par_configs):
            raise ValueError(f"n_par_configs must be non-empty with every n in [1, {L}], got {self.n_par_configs}")
        if not isinstance(self.stride, int) or self.stride < 0:
            raise ValueError(f"stride must be an int >= 0, got {self.stride!r}")
        if self.stride == 0 and not isinstance(self.jacobian, ls.Identity):
            raise ValueError(f"stride 0 compares the last block alone on h_(L-n), which takes no surrogate, but "
                             f"jacobian={self.jacobian!r}: give a stride >= 1 (a stride >= n compares the corrected "
                             "last state alone, as the published HCN recipe)")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.jacobian, ls.Mixing) and not model.config.use_mhc:
            raise ValueError("the HCN (Mixing) regularizer needs an mHC model (use_mhc=True)")

    def selected(self, n: int) -> list[int]:
        """Tail positions (0-based within the n layers) whose corrected states enter the loss (stride >= 1)."""
        return [j for j in range(1, n) if (j + 1) % self.stride == 0 or j == n - 1]

    def configs(self, step: int) -> tuple[int, ...]:
        if self.mode == "sample":
            return (random.Random(step).choice(self.n_par_configs),)
        return self.n_par_configs


def relative_gap(approx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over tokens of ||approx - target|| / max(||target||, 1e-6), norms over the last (feature) dim."""
    approx, target = at_least_float32(approx), at_least_float32(target)
    return ((approx - target).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-6)).mean()


def _as_preconditioner(system: ls.LayerSystem, outputs: torch.Tensor | None) -> ls.LayerSystem:
    """The system as the regularizer's solve sees it. The surrogate is a preconditioner, so its coefficients (the
    system's scales, mixing matrices and JVPs) are constants to the gradient: only the evaluations f_l(h_{L-n})
    carry it. `outputs`, when given, are those evaluations at the repeat guess, already made in one batched call:
    the solve's one evaluation is served from them."""
    def evaluate(layers: slice, inputs: torch.Tensor) -> torch.Tensor:
        return system.evaluate(layers, inputs) if outputs is None else outputs[layers]

    def jvp(layers: slice, inputs: torch.Tensor, tangents: torch.Tensor):
        with torch.no_grad():
            return system.jvp(layers, inputs, tangents)

    def mixing(layers: slice, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return system.mixing_matrices(layers, inputs)

    return ls.LayerSystem(evaluate, system.num_layers, jvp=jvp, mixing=None if system.mixing is None else mixing,
                          stream_dim=system.stream_dim,
                          scales=None if system.scales is None else system.scales.detach(),
                          state_shape=system.state_shape, dtype=system.dtype)


def one_iteration(system: ls.LayerSystem, start: torch.Tensor, jacobian: ls.Jacobian, seed: int,
                  outputs: torch.Tensor | None = None) -> torch.Tensor:
    """The trace (n + 1, *state) after one Newton iteration of `jacobian` from repeat, by layersolve's driver:
    h~_l = f_l(start) + J~_l (h~_{l-1} - start), the surrogate's coefficients held constant (`_as_preconditioner`).
    `outputs`: f_l(start) for every layer, when the caller evaluated them already (the batched mode). No
    divergence check (one iteration has nothing to compare), so no host sync per iteration."""
    solver = ls.Newton(jacobian=jacobian, divergence=None)
    return ls.solve(_as_preconditioner(system, outputs), start, solver, iters=1, seed=seed, throw=False).trace


def _batched_evaluations(model: GPT, emb: Embedded, trace: list[torch.Tensor], first: dict[int, int]
                         ) -> dict[int, torch.Tensor]:
    """For each config n, blocks first[n] .. L-1 (0-based) applied to its start h_{L-n}, all in one call."""
    L = model.config.n_layer
    counts = [L - first[n] for n in first]
    weights = cat_weights([model.block_weights(slice(first[n], L)) for n in first])
    ve = None if emb.ve is None else torch.cat([emb.ve[first[n]:] for n in first])
    inputs = torch.cat([trace[L - n].expand(count, *trace[L - n].shape) for n, count in zip(first, counts)])
    out = block_forward(weights, inputs, Context(emb.x0, ve, emb.cos, emb.sin, emb.position)).out
    return dict(zip(first, out.split(counts)))


def _approximations(model: GPT, emb: Embedded, trace: list[torch.Tensor], reg: Regularizer, n: int,
                    outputs: torch.Tensor | None, step: int) -> dict[int, torch.Tensor]:
    """Config n's approximate states h~, keyed by the index of the sequential state they are compared with."""
    L = model.config.n_layer
    start = trace[L - n]
    if reg.stride == 0:
        return {L: model.block(L - 1, start, emb) if outputs is None else outputs[0]}
    solved = one_iteration(model.layer_system(emb, L - n), start, reg.jacobian, step, outputs)
    return {L - n + j + 1: solved[j + 1] for j in reg.selected(n)}


def snlp_loss(model: GPT, emb: Embedded, trace: list[torch.Tensor], reg: Regularizer, step: int = 0) -> torch.Tensor:
    """The regularizer's value (before lambda and warm-up) for one batch, from the sequential trace h_0 .. h_L
    of the same forward (kept in the autograd graph)."""
    L = model.config.n_layer
    configs = reg.configs(step)
    outputs = {}
    if reg.mode == "batched":
        outputs = _batched_evaluations(model, emb, trace, {n: L - 1 if reg.stride == 0 else L - n for n in configs})
    loss = torch.zeros((), device=trace[-1].device)
    for n in configs:
        for index, approx in _approximations(model, emb, trace, reg, n, outputs.get(n), step).items():
            target = trace[index]
            loss = loss + relative_gap(approx, target.detach() if reg.detach_target else target)
    return loss
