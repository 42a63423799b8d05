"""Training: nanochat's recipe (Muon for block matrices, AdamW for embeddings, head and scalars; warm-up, constant,
linear warm-down), with SNLP-aware regularization and SNLP-forward fine-tuning; the step itself is `step.py`'s.

Checkpoints (`checkpoint.py`) are written every `save_every` steps and at the end, the newest `keep_checkpoints`
kept; `resume=True` continues from the latest bit-for-bit on the CPU. A new run needs an empty directory
(`rundir.py`). SIGINT or SIGTERM (Ctrl-C) stops the run after the step in flight, with a checkpoint
of it, by raising `Interrupted`; a second signal stops at once. Under torchrun the step is data-parallel with DDP,
each rank on its slice of the batch.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .. import nanochat
from . import rundir
from ..progress import progress
from ..nanochat.gpt import GPT
from .checkpoint import Resumed, restore, save_checkpoint
from .config import TrainConfig
from .data import TokenLoader, TokenStream, default_tokenizer, load_corpus, token_stream
from .distributed import Distributed, any_rank
from .evaluate import Validation, sequential_metrics
from .optim import optimizers, unused_parameters
from .step import StepLoss, train_step
from .tokenizer import Tokenizer, train_tokenizer


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


class Interrupted(Exception):
    """Training stopped on a signal after finishing a step and saving a checkpoint of it."""

    def __init__(self, step: int, directory: Path):
        super().__init__(f"interrupted at step {step}; its checkpoint is in {directory}")
        self.step, self.directory = step, directory


class StopRequests:
    """While active: the first SIGINT or SIGTERM records a request to stop after the step in flight (`signum`); a
    second one stops at once (KeyboardInterrupt). The previous handlers come back on exit. Python takes signals
    in the main thread only: elsewhere this records nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self) -> "StopRequests":
        self.signum, self.previous = None, {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            self._restore()
            raise KeyboardInterrupt
        self.signum = signum
        # os.write, not print: the handler may run while the progress bar is inside a buffered write to stderr.
        os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (again: stop "
                    "at once)\n".encode())

    def _restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def __exit__(self, *exc) -> None:
        self._restore()


def train(cfg: TrainConfig, data: Data, out_dir: str | Path, resume: bool = False, show_progress: bool = True,
          overwrite: bool = False, notes: dict | None = None) -> dict:
    """Train a model from scratch in an empty `out_dir` (or resume its latest checkpoint; or, with `overwrite`,
    replace the run there); returns the metrics, also written to `out_dir/metrics.json`, with the newest
    `cfg.keep_checkpoints` checkpoints and the tokenizer in `out_dir`. `notes`: JSON facts kept in every
    checkpoint's meta. Raises `Interrupted` after saving, when a signal asked to stop."""
    cfg.check()
    env = Distributed.from_env()
    out_dir = Path(out_dir)
    rundir.start(out_dir, resume, overwrite, env.rank)
    if data.tokenizer.get_vocab_size() != cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {data.tokenizer.get_vocab_size()} tokens but the model config "
                         f"vocab_size={cfg.model.vocab_size}: train with --vocab-size equal to the tokenizer's")
    if cfg.batch_size % env.world:
        raise ValueError(f"batch_size={cfg.batch_size} must be divisible by the {env.world} processes")
    model = _initial_model(cfg, env)
    opts = optimizers(model, cfg)
    loader = TokenLoader(data.train, cfg.batch_size // env.world, cfg.model.sequence_len, env.rank, env.world,
                         env.device)
    run = (restore(out_dir, cfg, model, opts, loader, env) if resume
           else Resumed(0, {"config": cfg.to_dict(), "train": [], "evals": [], "skipped_steps": 0}))
    metrics = run.metrics
    objective = StepLoss(model, cfg)
    if env.world > 1:
        objective = nn.parallel.DistributedDataParallel(objective)
    validation = data.validation(cfg)
    tokenizer = data.tokenizer  # written with this run's first checkpoint
    with StopRequests() as stop, progress(range(run.step, cfg.steps), initial=run.step, total=cfg.steps,
                                          disable=not show_progress or env.rank > 0, desc="train",
                                          unit="step") as bar:
        for step in bar:
            record = train_step(objective, opts, cfg, *next(loader), step)
            metrics["train"].append(asdict(record))
            metrics["skipped_steps"] += record.skipped
            bar.set_postfix(loss=f"{record.ce:.3f}", reg=f"{record.reg:.3f}", skipped=metrics["skipped_steps"],
                            tok_s=f"{cfg.batch_size * cfg.model.sequence_len / record.seconds:.0f}")
            done = step + 1
            last = done == cfg.steps
            stopping = any_rank(stop.signum is not None, env.device) and not last
            if not stopping and ((cfg.eval_every and done % cfg.eval_every == 0) or last):
                model.eval()
                metrics["evals"].append({"step": done, **sequential_metrics(model, validation)})
                model.train()
            if (cfg.save_every and done % cfg.save_every == 0) or last or stopping:
                save_checkpoint(out_dir, done, model, opts, loader, cfg, metrics, env, tokenizer, notes)
                if cfg.keep_checkpoints is not None:
                    rundir.rotate(out_dir, cfg.keep_checkpoints, env.rank)
                tokenizer = None
            if stopping:
                raise Interrupted(done, out_dir)
    return metrics


def _initial_model(cfg: TrainConfig, env: Distributed) -> GPT:
    """nanochat's initialization (or the `init_from` checkpoint's weights) on the run's device, with the parameters
    the config switches off frozen."""
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
    return model
