"""Muon (K. Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024), our own as nanochat
keeps its own: the update of a 2-D weight is the Nesterov momentum of its gradient, orthogonalized.

For a weight W (rows x cols) with gradient G, momentum mu, learning rate lr and weight decay wd, the arithmetic of
torch.optim.Muon with adjust_lr_fn="original", so the steps agree:

    B <- mu B + (1 - mu) G                       the momentum buffer (an exponential average)
    U <- (1 - mu) G + mu B                       Nesterov
    W <- (1 - lr wd) W - lr sqrt(max(1, rows / cols)) NS(U)

NS is five steps of the quintic Newton-Schulz iteration X <- a X + (b A + c A^2) X, A = X X^T, from
X = U / max(||U||_F, 1e-7) taken wide (transposed when tall), with (a, b, c) = (3.4445, -4.7750, 2.0315): it maps
the singular values of U into about [0.5, 1.5], an approximate U V^T that trains as well. It runs in bfloat16 on
CUDA, as torch's does, and in float32 on the CPU, whose bfloat16 matmul is slow (25x the float32 time on a
1.5M-parameter model).
"""

from __future__ import annotations

import math

import torch

COEFFICIENTS = (3.4445, -4.7750, 2.0315)
STEPS = 5
EPS = 1e-7


def orthogonalize(update: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """NS(update), computed in `dtype` (see the module docstring)."""
    a, b, c = COEFFICIENTS
    x = update.to(dtype)
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=EPS)
    for _ in range(STEPS):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class Muon(torch.optim.Optimizer):
    """Muon for 2-D parameters. `ns_dtype`: the dtype of the orthogonalization (default: bfloat16 on CUDA, float32
    on the CPU)."""

    def __init__(self, params, lr: float, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_dtype: torch.dtype | None = None):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            if not (isinstance(value, (int, float)) and value >= 0):
                raise ValueError(f"Muon: {name} must be a number >= 0, got {value!r}")
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon: parameters must be 2-D matrices, got one of shape {tuple(p.shape)}")
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("Muon.step takes no closure")
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buffer = state["momentum_buffer"]
                buffer.lerp_(p.grad, 1 - mu)
                update = orthogonalize(p.grad.lerp(buffer, mu), self.ns_dtype or default_dtype(p.device))
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * math.sqrt(max(1.0, p.shape[0] / p.shape[1])))
