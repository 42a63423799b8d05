"""One training step, the one the training loop runs and the step benchmark times: the learning rates of the
schedule, the objective under autocast (bfloat16 on CUDA), backward, gradient clipping, the optimizers' steps and
zeroed gradients.

The objective is cross-entropy plus lambda * w(t) * the SNLP regularizer on the trace of the same sequential forward
(w ramps linearly over the first `reg_warmup` of training); or, for SNLP-forward fine-tuning (SNLP v2), the
cross-entropy of `snlp.forward(model, x, sft_plan)`'s logits. A step whose SNLP solve did not end ok, on any rank,
is skipped (no update): a diverged solve's logits are not the model's, and their gradient is noise or NaN.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..inference import snlp
from ..nanochat.gpt import GPT
from .config import TrainConfig
from .distributed import any_rank
from .optim import lr_multiplier, reg_weight
from .regularizer import snlp_loss


@dataclass(frozen=True)
class Losses:
    """The objective of one batch: `total` to differentiate, its parts (detached) for the log, and whether the
    SNLP forward's solve ended ok (always, for the sequential forward)."""

    total: torch.Tensor
    ce: torch.Tensor
    reg: torch.Tensor
    solved: bool = True


class StepLoss(nn.Module):
    """The objective of one batch as a module, so DDP can wrap it."""

    def __init__(self, model: GPT, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, x: torch.Tensor, y: torch.Tensor, step: int) -> Losses:
        model, cfg = self.model, self.cfg
        if cfg.sft_plan is not None:
            out = snlp.forward(model, x, cfg.sft_plan, throw=False)
            ce = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten())
            return Losses(ce, ce.detach(), torch.zeros(()), out.result.ok)
        emb = model.embed(x)
        trace = model.trace(emb)
        logits = model.head(trace[-1], trace[model.backout_layer])
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if cfg.regularizer is None or cfg.reg_lambda == 0:
            return Losses(ce, ce.detach(), torch.zeros(()))
        reg = snlp_loss(model, emb, trace, cfg.regularizer, step)
        return Losses(ce + reg_weight(cfg, step) * reg, ce.detach(), reg.detach())


@dataclass(frozen=True)
class StepRecord:
    """What the metrics log keeps of a step. `skipped`: no update was made (the SNLP solve did not end ok)."""

    step: int
    loss: float
    ce: float
    reg: float
    skipped: bool
    seconds: float


def autocast(device: torch.device):
    """bfloat16 autocast on CUDA (nanochat's training precision); float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def train_step(objective: nn.Module, opts: list[torch.optim.Optimizer], cfg: TrainConfig, x: torch.Tensor,
               y: torch.Tensor, step: int) -> StepRecord:
    """One optimizer step of `objective` (a StepLoss, or its DDP wrapper) on the batch (x, y)."""
    t0 = time.perf_counter()
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_multiplier(cfg, step)
    with autocast(x.device):
        losses = objective(x, y, step)
    skipped = any_rank(not losses.solved, x.device)
    if not skipped:
        losses.total.backward()
        torch.nn.utils.clip_grad_norm_([p for opt in opts for g in opt.param_groups for p in g["params"]],
                                       cfg.grad_clip)
        for opt in opts:
            opt.step()
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    return StepRecord(step, losses.total.item(), losses.ce.item(), losses.reg.item(), skipped,
                      time.perf_counter() - t0)
