"""Evaluation: perplexity and bits per byte on a fixed validation stream, for the sequential forward and for a grid
of SNLP plans, with agreement against the sequential logits, per-layer error of the final iterate, wall time, and
autoregressive token agreement."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F


from ..inference import snlp
from .data import TokenStream, bpb_sums
from ..inference.decode import generate
from ..nanochat.gpt import GPT


@dataclass(frozen=True)
class Validation:
    """A fixed validation set: the stream, the tokenizer's bytes per token, and the batch shape."""

    stream: TokenStream
    token_bytes: torch.Tensor
    batch_size: int
    seq_len: int
    max_tokens: int

    def batches(self, device="cpu"):
        return self.stream.validation_batches(self.batch_size, self.seq_len, self.max_tokens, device=device)


def unigram_loss(train: TokenStream, val: Validation) -> float:
    """Cross-entropy (nats per token) on the validation batches of the train stream's token frequencies (add-one
    smoothed): the baseline a language model must beat."""
    vocab = val.token_bytes.numel()
    counts = torch.bincount(train.tokens.long(), minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = torch.cat([y.flatten() for _, y in val.batches()])
    return float(-logp[targets].mean())


def summarize(nats: float, tokens: int, nbytes: int) -> dict:
    loss = nats / max(tokens, 1)
    return {"loss": loss, "ppl": math.exp(loss), "bpb": nats / (math.log(2) * max(nbytes, 1)), "tokens": tokens}


@torch.no_grad()
def sequential_metrics(model: GPT, val: Validation) -> dict:
    """Loss, perplexity and bits per byte of the sequential forward."""
    return plan_metrics(model, val, None)["quality"]


@torch.no_grad()
def plan_metrics(model: GPT, val: Validation, plan: snlp.Plan | None) -> dict:
    """One cell of the grid: quality of the plan's logits, their agreement with the sequential logits, the tail's
    per-layer relative error of the final iterate (max over batches), and the wall time of both forwards."""
    device = model.lm_head.weight.device
    nats = tokens = nbytes = 0
    agree = cosine = 0.0
    layer_error = None
    seconds = {"plan": 0.0, "sequential": 0.0}
    for x, y in val.batches(device):
        t0 = time.perf_counter()
        reference = model(x)
        t1 = time.perf_counter()
        if plan is None:
            logits = reference
        else:
            _, exact = snlp.sequential_trace(model, x, plan)
            t1 = time.perf_counter()
            out = snlp.forward(model, x, plan, throw=False, reference=exact)
            logits, stats = out.logits, out.stats
            errors = stats.error[-1]
            layer_error = errors if layer_error is None else torch.maximum(layer_error, errors)
        t2 = time.perf_counter()
        seconds["sequential"] += t1 - t0
        seconds["plan"] += t2 - t1 if plan is not None else t1 - t0
        losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        batch_nats, batch_bytes = bpb_sums(losses, y.flatten(), val.token_bytes)
        nats, nbytes, tokens = nats + float(batch_nats), nbytes + int(batch_bytes), tokens + y.numel()
        agree += float((logits.argmax(-1) == reference.argmax(-1)).float().sum())
        cosine += float(F.cosine_similarity(logits.float(), reference.float(), dim=-1).sum())
    out = {"quality": summarize(nats, tokens, nbytes), "top1_agreement": agree / tokens,
           "mean_cosine": cosine / tokens, "seconds": seconds,
           "speedup": seconds["sequential"] / seconds["plan"] if seconds["plan"] else float("nan")}
    if layer_error is not None:
        out["layer_error"] = [float(e) for e in layer_error]
    return out


def grid(model: GPT, val: Validation, plans: Mapping[str, snlp.Plan],
         progress: Callable[[str], None] = print) -> dict:
    """Sequential quality, then every plan's cell, keyed by the plans' names (the caller names them)."""
    rows = {"sequential": plan_metrics(model, val, None)}
    progress(f"[0/{len(plans)}] sequential: ppl {rows['sequential']['quality']['ppl']:.3f}")
    for i, (name, plan) in enumerate(plans.items(), start=1):
        rows[name] = plan_metrics(model, val, plan)
        progress(f"[{i}/{len(plans)}] {name}: ppl {rows[name]['quality']['ppl']:.3f}, "
                 f"top-1 {rows[name]['top1_agreement']:.3f}")
    return rows


def grid_table(rows: dict) -> str:
    lines = [f"{'plan':<28} {'ppl':>9} {'bpb':>7} {'top-1':>7} {'cosine':>7} {'max layer err':>14} {'speedup':>8}"]
    for name, r in rows.items():
        err = max(r["layer_error"]) if r.get("layer_error") else 0.0
        lines.append(f"{name:<28} {r['quality']['ppl']:>9.3f} {r['quality']['bpb']:>7.4f} {r['top1_agreement']:>7.3f} "
                     f"{r['mean_cosine']:>7.4f} {err:>14.2e} {r['speedup']:>7.2f}x")
    return "\n".join(lines)


@torch.no_grad()
def autoregressive_agreement(model: GPT, prompts: torch.Tensor, max_new: int, plan: snlp.Plan) -> float:
    """Fraction of greedy tokens where SNLP decoding matches sequential decoding, from the same prompts (B, T)."""
    sequential = generate(model, prompts, max_new)
    parallel = generate(model, prompts, max_new, plan=plan)
    return float((sequential == parallel).float().mean())
