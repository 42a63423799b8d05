"""Training: nanochat's recipe (Muon for block matrices, AdamW for embeddings, head and scalars; warm-up, constant,
linear warm-down), with SNLP-aware regularization and SNLP-forward fine-tuning.

One step: the sequential forward keeps its trace, the loss is cross-entropy plus lambda * w(t) * the regularizer
on that trace (w ramps linearly over the first `reg_warmup` of training); or, for SNLP-forward SFT, cross-entropy on
the logits of `snlp.forward(model, x, sft_plan)`. Checkpoints hold the weights (nanochat format), the optimizer
state, the data position and the metrics, written atomically; `resume=True` continues bit-for-bit on the CPU.
Under torchrun the step is data-parallel with DDP (nccl on GPU, gloo on CPU), each rank on its slice of the batch.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import nanochat
from ..inference import snlp
from ..io import write_atomic, write_json
from ..nanochat.gpt import GPT
from .config import TrainConfig
from .data import TokenLoader, TokenStream, default_tokenizer, load_corpus, token_stream
from .evaluate import Validation, sequential_metrics
from .optim import cpu_float32_newton_schulz, lr_multiplier, optimizers, reg_weight, unused_parameters
from .regularizer import snlp_loss
from .tokenizer import Tokenizer, train_tokenizer


class StepLoss(nn.Module):
    """The training objective of one batch as a module, so DDP can wrap it: returns (loss, cross-entropy, reg)."""

    def __init__(self, model: GPT, cfg: TrainConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, x: torch.Tensor, y: torch.Tensor, step: int):
        model, cfg = self.model, self.cfg
        if cfg.sft_plan is not None:
            logits = snlp.forward(model, x, cfg.sft_plan, throw=False).logits
            ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            return ce, ce.detach(), torch.zeros(())
        emb = model.embed(x)
        trace = model.trace(emb)
        logits = model.head(trace[-1], trace[model.backout_layer])
        ce = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        if cfg.regularizer is None or cfg.reg_lambda == 0:
            return ce, ce.detach(), torch.zeros(())
        reg = snlp_loss(model, emb, trace, cfg.regularizer, step)
        return ce + reg_weight(cfg, step) * reg, ce.detach(), reg.detach()


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls) -> "Distributed":
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a single process otherwise."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        return cls(rank, world, device)


@dataclass
class Data:
    """Training and validation token streams of one corpus and tokenizer."""

    train: TokenStream
    val: TokenStream
    tokenizer: Tokenizer

    @classmethod
    def prepare(cls, source: str | Path | None, vocab_size: int, cache_dir: str | Path) -> "Data":
        """The corpus (None: the embedded Shakespeare), split deterministically; the tokenizer trained on the
        training split only (cached for the default corpus); both streams tokenized (cached)."""
        train_text, val_text = load_corpus(source).split()
        tokenizer = (default_tokenizer(cache_dir, vocab_size) if source is None
                     else train_tokenizer(train_text.texts, vocab_size))
        return cls(token_stream(train_text, tokenizer, cache_dir), token_stream(val_text, tokenizer, cache_dir),
                   tokenizer)

    def validation(self, cfg: TrainConfig, batch_size: int = 8) -> Validation:
        return Validation(self.val, self.tokenizer.token_bytes(), batch_size, cfg.model.sequence_len, cfg.eval_tokens)


def _optimizer_path(directory: Path, step: int, rank: int) -> Path:
    return directory / f"optim_{step:06d}_rank{rank}.pt"


def save_checkpoint(directory: Path, step: int, model: GPT, opts, loader: TokenLoader, cfg: TrainConfig,
                    metrics: dict, env: Distributed) -> None:
    """Optimizer state first (every rank), then metrics, then meta and weights (rank 0): a checkpoint is complete
    when its model file exists, and every file is written atomically."""
    state = {"optimizers": [o.state_dict() for o in opts]}
    write_atomic(_optimizer_path(directory, step, env.rank), lambda f: torch.save(state, f))
    if env.rank == 0:
        write_json(directory / "metrics.json", metrics)
        nanochat.save(model, directory, step, meta={"train_config": cfg.to_dict(), "loader": loader.state_dict(),
                                                    "world_size": env.world})


def restore(directory: Path, cfg: TrainConfig, model: GPT, opts, loader: TokenLoader, env: Distributed):
    """Load the latest checkpoint of `directory` into the run; returns (next step, metrics so far)."""
    available = nanochat.steps(directory)
    if not available:
        raise FileNotFoundError(f"--resume: no checkpoint in {directory}; start without --resume")
    step = available[-1]
    meta = json.loads(nanochat.paths(directory, step)[1].read_text())
    saved, current = meta.get("train_config", {}), cfg.to_dict()
    differing = sorted(k for k in set(saved) | set(current) if k != "steps" and saved.get(k) != current.get(k))
    if differing:
        raise ValueError(f"--resume: the checkpoint in {directory} was trained with another config (differing: "
                         f"{differing}); resume with the same settings, or train into a new --out directory")
    model.load_state_dict(nanochat.load(directory, step, device=env.device).state_dict())
    state = torch.load(_optimizer_path(directory, step, env.rank), map_location=env.device, weights_only=False)
    for opt, s in zip(opts, state["optimizers"]):
        opt.load_state_dict(s)
    loader.load_state_dict(meta["loader"])
    metrics = json.loads((directory / "metrics.json").read_text())
    metrics["train"] = [r for r in metrics["train"] if r["step"] < step]
    metrics["evals"] = [r for r in metrics["evals"] if r["step"] <= step]
    return step, metrics


def train(cfg: TrainConfig, data: Data, out_dir: str | Path, resume: bool = False, show_progress: bool = True) -> dict:
    """Train a model from scratch (or resume `out_dir`'s latest checkpoint); returns the metrics, also written to
    `out_dir/metrics.json`, with the final checkpoint in `out_dir`."""
    env = Distributed.from_env()
    out_dir = Path(out_dir)
    if data.tokenizer.get_vocab_size() != cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {data.tokenizer.get_vocab_size()} tokens but the model config "
                         f"vocab_size={cfg.model.vocab_size}: train with --vocab-size equal to the tokenizer's")
    if cfg.batch_size % env.world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {env.world} processes")
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    model.init_weights(seed=cfg.seed)
    if cfg.init_from is not None:
        start_model = nanochat.load(cfg.init_from)
        if start_model.config != cfg.model:
            raise ValueError(f"init_from={cfg.init_from} holds a model of another config ({start_model.config}); "
                             "fine-tune with the checkpoint's own model settings")
        model.load_state_dict(start_model.state_dict())
    model.to(env.device)
    for p in unused_parameters(model):
        p.requires_grad_(False)
    if cfg.regularizer is not None:
        cfg.regularizer.check(model)
    opts = optimizers(model, cfg)
    loader = TokenLoader(data.train, cfg.batch_size // env.world, cfg.model.sequence_len, env.rank, env.world,
                         env.device)
    metrics = {"config": cfg.to_dict(), "train": [], "evals": []}
    start, metrics = restore(out_dir, cfg, model, opts, loader, env) if resume else (0, metrics)
    step_loss = StepLoss(model, cfg)
    if env.world > 1:
        step_loss = nn.parallel.DistributedDataParallel(step_loss)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if env.device.type == "cuda"
                else contextlib.nullcontext())
    validation = data.validation(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not show_progress or env.rank > 0,
               desc="train", unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 15.0)  # a log file gets a line every 15 s
    tokens_per_step = cfg.batch_size * cfg.model.sequence_len
    for step in bar:
        t0 = time.perf_counter()
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lr_multiplier(cfg, step)
        x, y = next(loader)
        with autocast:
            loss, ce, reg = step_loss(x, y, step)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        with cpu_float32_newton_schulz():
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        metrics["train"].append({"step": step, "loss": loss.item(), "ce": ce.item(), "reg": reg.item(),
                                 "seconds": seconds})
        bar.set_postfix(loss=f"{float(ce):.3f}", reg=f"{float(reg):.3f}", tok_s=f"{tokens_per_step / seconds:.0f}")
        last = step + 1 == cfg.steps
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or last:
            model.eval()
            metrics["evals"].append({"step": step + 1, **sequential_metrics(model, validation)})
            model.train()
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or last:
            save_checkpoint(out_dir, step + 1, model, opts, loader, cfg, metrics, env)
    return metrics
