"""Evaluation: perplexity and bits per byte on a fixed validation stream, for the sequential forward and for a grid
of SNLP plans, with agreement against the sequential logits, per-layer error of the final iterate, how the solves
ended, and autoregressive token agreement. Speed is not measured here: `models.tools.bench.speedups` times the
plans for every table that shows it, by one method.

Loss, perplexity and bits per byte count the targets that stand for text: special tokens (BOS, which starts
every document) decode to no bytes and are left out of the loss, its token count and the unigram baseline alike,
as nanochat's evaluate_bpb leaves them out."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

import layersolve as ls

from ..inference import snlp
from ..inference.decode import generate
from ..nanochat.block import at_least_float32
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

    def quality(self, context: int) -> dict:
        """Loss (nats per text token), perplexity, and bits per byte (nats / (ln 2 * bytes)), with the text tokens
        they count and the context (tokens per sequence) those were read in: a perplexity depends on both."""
        loss = self.nats / max(self.tokens, 1)
        return {"loss": loss, "ppl": math.exp(loss), "bpb": self.nats / (math.log(2) * max(self.nbytes, 1)),
                "tokens": self.tokens, "context": context}


def describe(quality: dict) -> str:
    """A perplexity as every command prints it: with its token count and context, so that two of them can be
    compared (the same model reads lower at a longer context, and a few tokens make a noisy figure)."""
    return f"ppl {quality['ppl']:.3f} over {quality['tokens']:,} tokens at context {quality['context']}"


def kl(target: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(p || q), p = softmax(target), q = softmax(logits), in at least float32."""
    logp = torch.log_softmax(at_least_float32(target), dim=-1)
    return (logp.exp() * (logp - torch.log_softmax(at_least_float32(logits), dim=-1))).sum(-1).mean()


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
def plan_metrics(model: GPT, val: Validation, plan: snlp.Plan | None, reference: GPT | None = None) -> dict:
    """One cell of the grid: quality of the plan's logits (plan None: the sequential forward's), their agreement
    with the sequential logits of `reference` (default the model itself; the original, for an adapted model) over
    every position: top-1, cosine and KL(reference || plan); the segment's per-layer relative error of the final
    iterate (max over batches), and how its solves ended (the worst result over batches, and how many batches did
    not end ok). No timing: a plan's speed is measured once, by the benchmarks' method
    (`models.tools.bench.speedups`), for every table that shows it."""
    device = model.lm_head.weight.device
    sums, positions, agree, cosine, divergence = TextSums(), 0, 0.0, 0.0, 0.0
    results, stats = [], []
    reference = model if reference is None else reference
    for x, y in val.batches(device):
        reference_logits = reference(x)
        if plan is None:
            logits = reference_logits if reference is model else model(x)
        else:
            _, exact = snlp.sequential_trace(model, x, plan)
            out = snlp.forward(model, x, plan, throw=False, reference=exact)
            logits = out.logits
            results.append(out.result)
            stats.append(out.stats)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")  # logits: >= float32
        sums = sums + TextSums.of(losses, y.flatten(), val)
        positions += y.numel()
        agree += float((logits.argmax(-1) == reference_logits.argmax(-1)).sum())
        cosine += float(F.cosine_similarity(logits, reference_logits, dim=-1).sum())
        divergence += float(kl(reference_logits, logits)) * y.numel()
    row = {"quality": sums.quality(val.seq_len), "top1_agreement": agree / positions, "mean_cosine": cosine / positions,
           "kl": divergence / positions}
    if plan is not None:
        row["result"] = ls.Result.worst(results).name
        row["failed_batches"] = sum(not r.ok for r in results)
        row["batches"] = len(results)
        row["layer_error"] = ls.Stats.worst(stats).error[-1].tolist()
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
    progress(f"[0/{len(plans)}] sequential: {describe(rows['sequential']['quality'])}")
    for i, (name, plan) in enumerate(plans.items(), start=1):
        rows[name] = plan_metrics(model, val, plan)
        progress(f"[{i}/{len(plans)}] {name}: ppl {rows[name]['quality']['ppl']:.3f}, "
                 f"top-1 {rows[name]['top1_agreement']:.3f}, {_outcome(rows[name])}")
    return rows


def grid_table(rows: dict, speed: dict | None = None) -> str:
    """The grid as text, with a legend of its columns under it; `speed` (from `models.tools.bench.speedups`) adds
    the speedup column and names its baseline. A row whose solve did not end ok on some batch is marked."""
    width = max(28, *(len(name) for name in rows))
    lines = [f"{'plan':<{width}} {'ppl':>9} {'bpb':>7} {'top-1':>7} {'cosine':>7} {'max layer err':>14}"
             + (f" {'speedup':>8}" if speed else "") + "  solve"]
    for name, r in rows.items():
        err = max(r["layer_error"]) if r.get("layer_error") else 0.0
        timing = f" {speed['rows'][name]['speedup']:>7.2f}x" if speed else ""
        ppl = r["quality"]["ppl"]
        ppl = f"{ppl:>9.3f}" if ppl < 1e5 else f"{ppl:>9.3g}"  # a diverged plan's PPL keeps the column's width
        lines.append(f"{name:<{width}} {ppl} {r['quality']['bpb']:>7.4f} "
                     f"{r['top1_agreement']:>7.3f} {r['mean_cosine']:>7.4f} {err:>14.2e}{timing}  {_outcome(r)}")
    lines += ["", *legend(rows, speed)]
    if any(r.get("failed_batches") for r in rows.values()):
        lines.append(f"{FAILED_MARK}: the solve did not end ok (diverged, non-finite or short of its tolerance) on "
                     "that many batches, whose logits are not the model's: the row is not the plan's quality")
    return "\n".join(lines)


def legend(rows: dict, speed: dict | None) -> list[str]:
    """What each column of `grid_table` measures (K0 explained only where a K0 plan is shown)."""
    quality = rows["sequential"]["quality"]
    guess = " K0: the initial guess only, no iteration." if any(" K0" in name for name in rows) else ""
    lines = [f"ppl, bpb: validation perplexity and bits per byte of the plan's logits, over {quality['tokens']:,} "
             f"text tokens in sequences of {quality['context']} (the context). top-1, cosine: agreement of its "
             "logits with the sequential forward's (argmax, cosine), over every position.",
             "max layer err: the largest relative error ||h_l - h_l*|| / ||h_l*|| of the solved layers' final "
             f"iterate against the sequential trace, over those layers and the batches.{guess}",
             "solve: how the solve ended (COMPLETED: K iterations done; CONVERGED: exact to rounding)."]
    if speed:
        lines.append(f"speedup: the median time of the {speed['baseline']} over the plan's, {speed['repeats']} "
                     "calls each, interleaved, after warm-up (the method of `snlp bench`).")
    return lines


@torch.no_grad()
def autoregressive_agreement(model: GPT, prompts: torch.Tensor, max_new: int, plan: snlp.Plan) -> float:
    """Fraction of greedy tokens where SNLP decoding matches sequential decoding, from the same prompts (B, T)."""
    sequential = generate(model, prompts, max_new)
    parallel = generate(model, prompts, max_new, plan=plan)
    return float((sequential == parallel).float().mean())
