"""SNLP-aware regularization (SNLP section on training; REFERENCE.md): train the model so that one surrogate Newton
iteration over its last n layers lands close to the sequential trace.

For each n in `n_par_configs`, the last n blocks are solved from the sequential h_{L-n} (repeat init) with one
iteration of the chosen surrogate (IDN: J~ = I; Scaled: the resid lambdas; HCN: the mHC mixing; Diagonal:
Hutchinson), and

    loss += sum over selected layers l of mean_tokens( ||h~_l - h_l|| / max(||h_l||, 1e-6) )

(relative L2 over the feature dim, not squared), over every `stride`-th layer of the tail and its last layer. The
target h_l is the sequential trace, optionally detached. The trainer multiplies the sum by lambda and a linear
warm-up w(t).

Modes: "all" evaluates every config every step (the published recipe, ~1 + sum(n)/L forwards); "sample" draws one
config per step (seeded by the step); "batched" evaluates every config's layers in one batched call (the same work
as "all" in fewer, larger kernels).
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
    stride: int = 1  # compare every stride-th tail layer (and always the last); 0: the last layer only
    detach_target: bool = False
    mode: str = "all"

    def check(self, model: GPT) -> None:
        L = model.config.n_layer
        if not self.n_par_configs or any(not 1 <= n <= L for n in self.n_par_configs):
            raise ValueError(f"n_par_configs must be non-empty with every n in [1, {L}], got {self.n_par_configs}")
        if self.stride < 0:
            raise ValueError(f"stride must be >= 0, got {self.stride}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if isinstance(self.jacobian, ls.Mixing) and not model.config.use_mhc:
            raise ValueError("the HCN (Mixing) regularizer needs an mHC model (use_mhc=True)")

    def selected(self, n: int) -> list[int]:
        """Tail positions (0-based within the n layers) that enter the loss."""
        if self.stride == 0:
            return [n - 1]
        return sorted({j for j in range(self.stride - 1, n, self.stride)} | {n - 1})

    def configs(self, step: int) -> tuple[int, ...]:
        if self.mode == "sample":
            return (random.Random(step).choice(self.n_par_configs),)
        return self.n_par_configs


def relative_gap(approx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean over tokens of ||approx - target|| / max(||target||, 1e-6), norms over the last (feature) dim."""
    approx, target = at_least_float32(approx), at_least_float32(target)
    return ((approx - target).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-6)).mean()


def one_iteration(system: ls.LayerSystem, start: torch.Tensor, outputs: torch.Tensor,
                  jacobian: ls.Jacobian, seed: int) -> torch.Tensor:
    """h^1 from repeat init after one Newton iteration, given the evaluations outputs_l = f_l(start):
    h^1 = start + delta with delta_l = J~_l delta_{l-1} + (outputs_l - start), the driver's update with a repeat
    guess. (n, *state)."""
    n = outputs.shape[0]
    inputs = start.expand(n, *start.shape)
    step = ls.Step(system, slice(0, n), inputs, outputs, ls.jacobians.Work(),
                   torch.Generator(device=start.device).manual_seed(seed))
    with torch.no_grad():  # the surrogate is a preconditioner: its coefficients are constants to the gradient
        surrogate = jacobian.linearize(step)
    return start + surrogate.solve(outputs - start)


def snlp_loss(model: GPT, emb: Embedded, trace: list[torch.Tensor], reg: Regularizer, step: int = 0) -> torch.Tensor:
    """The regularizer's value (before lambda and warm-up) for one batch, from the sequential trace h_0 .. h_L
    of the same forward (kept in the autograd graph)."""
    L = model.config.n_layer
    configs = reg.configs(step)
    starts = {n: trace[L - n] for n in configs}
    systems = {n: model.layer_system(emb, L - n) for n in configs}
    if reg.mode == "batched":  # one call evaluates every config's tail at its own start
        weights = cat_weights([model.block_weights(slice(L - n, L)) for n in configs])
        ve = None if emb.ve is None else torch.cat([emb.ve[L - n:] for n in configs])
        inputs = torch.cat([starts[n].expand(n, *starts[n].shape) for n in configs])
        out = block_forward(weights, inputs, Context(emb.x0, ve, emb.cos, emb.sin, emb.position)).out
        outputs = dict(zip(configs, out.split(list(configs))))
    else:
        outputs = {n: systems[n].evaluate(slice(0, n), starts[n].expand(n, *starts[n].shape)) for n in configs}
    loss = torch.zeros((), device=trace[-1].device)
    for n in configs:
        approx = one_iteration(systems[n], starts[n], outputs[n], reg.jacobian, seed=step)
        for j in reg.selected(n):
            target = trace[L - n + j + 1]
            loss = loss + relative_gap(approx[j], target.detach() if reg.detach_target else target)
    return loss
