"""nanochat's optimization recipe: Muon (ours, `muon.py`) for the blocks' 2-D matrices, AdamW for embeddings,
head and scalars with nanochat's groups, learning rates and betas; warm-up, constant, linear warm-down."""

from __future__ import annotations

import torch
from torch import nn

from ..nanochat.gpt import GPT
from .config import TrainConfig
from .muon import Muon


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
    muon = Muon(matrices, lr=cfg.matrix_lr, momentum=0.95, weight_decay=cfg.weight_decay)
    for opt in (adam, muon):
        for g in opt.param_groups:
            g["initial_lr"] = g["lr"]
    return [muon, adam]
