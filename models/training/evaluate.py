"""Evaluation: perplexity and bits per byte on a fixed validation stream, for the sequential forward and for a grid
of SNLP plans, with agreement against the sequential logits, per-layer error of the final iterate, how the solves
ended, wall time, and autoregressive token agreement.

Loss, perplexity and bits per byte count the targets that stand for text: special tokens (BOS, which starts
every document) decode to no bytes and are left out of the loss, its token count and the unigram baseline alike,
as nanochat's evaluate_bpb leaves them out."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

import layersolve as ls

from ..inference import snlp
from ..inference.decode import generate
from ..nanochat.gpt import GPT
from .data import TokenStream

FAILED_MARK = "!"


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

    def is_text(self, targets: torch.Tensor) -> torch.Tensor:
        """The targets that stand for text: those that decode to at least one byte (not BOS)."""
        return self.token_bytes.to(targets.device)[targets] > 0


@dataclass(frozen=True)
class TextSums:
    """Sums over the text targets of some batches (accumulate with +): their per-token losses in nats, how many
    they are, and the UTF-8 bytes they decode to."""

    nats: float = 0.0
    tokens: int = 0
    nbytes: int = 0

    @classmethod
    def of(cls, losses: torch.Tensor, targets: torch.Tensor, val: Validation) -> "TextSums":
        """From per-token losses (`reduction="none"`) and their targets."""
        text = val.is_text(targets)
        nbytes = val.token_bytes.to(targets.device)[targets]
        return cls(float(losses.double()[text].sum()), int(text.sum()), int(nbytes.sum()))

    def __add__(self, other: "TextSums") -> "TextSums":
        return TextSums(self.nats + other.nats, self.tokens + other.tokens, self.nbytes + other.nbytes)

    def quality(self) -> dict:
        """Loss (nats per text token), perplexity, and bits per byte (nats / (ln 2 * bytes))."""
        loss = self.nats / max(self.tokens, 1)
        return {"loss": loss, "ppl": math.exp(loss), "bpb": self.nats / (math.log(2) * max(self.nbytes, 1)),
                "tokens": self.tokens}


def unigram_loss(train: TokenStream, val: Validation) -> float:
    """Cross-entropy (nats per text token) on the validation batches' text targets of the train stream's token
    frequencies (add-one smoothed): the baseline a language model must beat."""
    vocab = val.token_bytes.numel()
    counts = torch.bincount(train.tokens.long(), minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    targets = torch.cat([y[val.is_text(y)] for _, y in val.batches()])
    return float(-logp[targets].mean())


@torch.no_grad()
def sequential_metrics(model: GPT, val: Validation) -> dict:
    """Loss, perplexity and bits per byte of the sequential forward."""
    return plan_metrics(model, val, None)["quality"]


@torch.no_grad()
def plan_metrics(model: GPT, val: Validation, plan: snlp.Plan | None) -> dict:
    """One cell of the grid: quality of the plan's logits, their agreement with the sequential logits (over every
    position), the tail's per-layer relative error of the final iterate (max over batches), how its solves ended
    (the worst result over batches, and how many batches did not end ok), and the wall time of both forwards."""
    device = model.lm_head.weight.device
    sums, positions, agree, cosine = TextSums(), 0, 0.0, 0.0
    layer_error, results = None, []
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
            logits = out.logits
            results.append(out.result)
            errors = out.stats.error[-1]
            layer_error = errors if layer_error is None else torch.maximum(layer_error, errors)
        t2 = time.perf_counter()
        seconds["sequential"] += t1 - t0
        seconds["plan"] += t2 - t1 if plan is not None else t1 - t0
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")  # logits: >= float32
        sums = sums + TextSums.of(losses, y.flatten(), val)
        positions += y.numel()
        agree += float((logits.argmax(-1) == reference.argmax(-1)).sum())
        cosine += float(F.cosine_similarity(logits, reference, dim=-1).sum())
    row = {"quality": sums.quality(), "top1_agreement": agree / positions, "mean_cosine": cosine / positions,
           "seconds": seconds,
           "speedup": seconds["sequential"] / seconds["plan"] if seconds["plan"] else float("nan")}
    if plan is not None:
        row["result"] = ls.Result.worst(results).name
        row["failed_batches"] = sum(not r.ok for r in results)
        row["batches"] = len(results)
        row["layer_error"] = [float(e) for e in layer_error]
    return row


def _outcome(row: dict) -> str:
    if "result" not in row:
        return "sequential"
    failed = f" {FAILED_MARK} {row['failed_batches']}/{row['batches']} batches" if row["failed_batches"] else ""
    return row["result"] + failed


def grid(model: GPT, val: Validation, plans: Mapping[str, snlp.Plan],
         progress: Callable[[str], None] = print) -> dict:
    """Sequential quality, then every plan's cell, keyed by the plans' names (the caller names them)."""
    rows = {"sequential": plan_metrics(model, val, None)}
    progress(f"[0/{len(plans)}] sequential: ppl {rows['sequential']['quality']['ppl']:.3f}")
    for i, (name, plan) in enumerate(plans.items(), start=1):
        rows[name] = plan_metrics(model, val, plan)
        progress(f"[{i}/{len(plans)}] {name}: ppl {rows[name]['quality']['ppl']:.3f}, "
                 f"top-1 {rows[name]['top1_agreement']:.3f}, {_outcome(rows[name])}")
    return rows


def grid_table(rows: dict) -> str:
    """The grid as text; a row whose solve did not end ok on some batch is marked, and a note says what the
    mark means."""
    lines = [f"{'plan':<28} {'ppl':>9} {'bpb':>7} {'top-1':>7} {'cosine':>7} {'max layer err':>14} {'speedup':>8}  "
             "solve"]
    for name, r in rows.items():
        err = max(r["layer_error"]) if r.get("layer_error") else 0.0
        lines.append(f"{name:<28} {r['quality']['ppl']:>9.3f} {r['quality']['bpb']:>7.4f} {r['top1_agreement']:>7.3f} "
                     f"{r['mean_cosine']:>7.4f} {err:>14.2e} {r['speedup']:>7.2f}x  {_outcome(r)}")
    if any(r.get("failed_batches") for r in rows.values()):
        lines.append(f"{FAILED_MARK}: the solve did not end ok (diverged, non-finite or short of its tolerance) on "
                     "that many batches, whose logits are not the model's: the row is not the plan's quality")
    return "\n".join(lines)


@torch.no_grad()
def autoregressive_agreement(model: GPT, prompts: torch.Tensor, max_new: int, plan: snlp.Plan) -> float:
    """Fraction of greedy tokens where SNLP decoding matches sequential decoding, from the same prompts (B, T)."""
    sequential = generate(model, prompts, max_new)
    parallel = generate(model, prompts, max_new, plan=plan)
    return float((sequential == parallel).float().mean())
