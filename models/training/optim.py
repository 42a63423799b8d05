"""nanochat's optimization recipe: Muon (torch.optim.Muon) for the blocks' 2-D matrices, AdamW for embeddings,
head and scalars with nanochat's groups, learning rates and betas; warm-up, constant, linear warm-down.

On the CPU, torch's Muon runs its Newton-Schulz orthogonalization in bfloat16, which this machine's CPU has no fast
matmul for (2 s per step for a 1.5M-parameter model, 25x the float32 time). `cpu_float32_newton_schulz` runs the
same iteration, with the same coefficients, in float32 for CPU tensors while the optimizer steps; CUDA tensors keep
torch's bfloat16 path.
"""

from __future__ import annotations

import contextlib

import torch
import torch.optim._muon as _muon
from torch import nn

from ..nanochat.gpt import GPT
from .config import TrainConfig


def lr_multiplier(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, constant, linear warm-down to final_lr_frac (nanochat's schedule)."""
    warmdown = round(cfg.warmdown_ratio * cfg.steps)
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if step <= cfg.steps - warmdown:
        return 1.0
    progress = (cfg.steps - step) / warmdown
    return progress + (1 - progress) * cfg.final_lr_frac


def reg_weight(cfg: TrainConfig, step: int) -> float:
    ramp = cfg.reg_warmup * cfg.steps
    return cfg.reg_lambda * (min(1.0, (step + 1) / ramp) if ramp > 0 else 1.0)


def unused_parameters(model: GPT) -> list[nn.Parameter]:
    """Parameters the config switches off: they get no gradient, so they are frozen and left out of the
    optimizers (as the SNLP fork does)."""
    cfg = model.config
    out = list(model.value_embeds.parameters()) if cfg.no_ve else []
    out += [model.resid_lambdas, model.x0_lambdas] if cfg.no_x0_resid else []
    return out + list(getattr(model, "mtp_projs", nn.ModuleList()).parameters())


def optimizers(model: GPT, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Muon for the 2-D matrices of the blocks, AdamW for the rest, grouped and scaled as nanochat does."""
    frozen = {id(p) for p in unused_parameters(model)}
    hyper = {id(p) for b in model.transformer.h for name in ("hc_attn", "hc_mlp") if hasattr(b, name)
             for p in getattr(b, name).parameters()}
    matrices = [p for p in model.transformer.h.parameters() if p.ndim == 2 and id(p) not in hyper | frozen]
    scale = (model.config.n_embd / 768) ** -0.5

    def group(params, lr, betas, wd):
        return dict(params=[p for p in params if id(p) not in frozen], lr=lr, betas=betas, weight_decay=wd)

    adam_groups = [
        group(model.lm_head.parameters(), cfg.unembedding_lr * scale, (0.8, 0.96), 0.01),
        group(model.transformer.wte.parameters(), cfg.embedding_lr * scale, (0.8, 0.995), 0.001),
        group(model.value_embeds.parameters(), cfg.embedding_lr * scale * 0.5, (0.8, 0.995), 0.01),
        group([model.resid_lambdas], cfg.scalar_lr * 0.01, (0.8, 0.95), 0.05),
        group([model.x0_lambdas], cfg.scalar_lr, (0.96, 0.95), 0.0),
        group([model.smear_gate.weight, model.smear_lambda, model.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        group([p for p in model.transformer.h.parameters() if id(p) in hyper], 0.01, (0.9, 0.999), 0.0),
    ]
    adam = torch.optim.AdamW([g for g in adam_groups if g["params"]], eps=1e-10)
    muon = torch.optim.Muon(matrices, lr=cfg.matrix_lr, momentum=0.95, weight_decay=cfg.weight_decay,
                            adjust_lr_fn="original")
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    return [muon, adam]


def _newton_schulz_float32(grad: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """torch's quintic Newton-Schulz iteration (torch.optim._muon), in float32."""
    a, b, c = coefficients
    x = grad.float()
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


@contextlib.contextmanager
def cpu_float32_newton_schulz():
    """While active, Muon orthogonalizes CPU gradients in float32 (see the module docstring)."""
    original = _muon._zeropower_via_newtonschulz

    def dispatch(grad, coefficients, steps, eps):
        return original(grad, coefficients, steps, eps) if grad.is_cuda else _newton_schulz_float32(
            grad, coefficients, steps, eps)

    _muon._zeropower_via_newtonschulz = dispatch
    try:
        yield
    finally:
        _muon._zeropower_via_newtonschulz = original
