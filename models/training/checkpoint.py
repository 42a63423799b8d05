"""Checkpoints of a training run: the weights and meta in nanochat's format, the optimizers' state per rank, the
data position and the metrics; the tokenizer with the run's first checkpoint, so any checkpoint directory loads on
its own. Every file is written atomically, and a checkpoint is complete when its model file exists."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import nanochat
from ..nanochat.checkpoint import CheckpointError
from ..io import write_atomic, write_json
from ..nanochat.gpt import GPT
from .config import TrainConfig
from .data import TokenLoader
from .distributed import Distributed
from .tokenizer import Tokenizer


def optimizer_path(directory: Path, step: int, rank: int) -> Path:
    return directory / f"optim_{step:06d}_rank{rank}.pt"


def save_checkpoint(directory: Path, step: int, model: GPT, opts, loader: TokenLoader, cfg: TrainConfig,
                    metrics: dict, env: Distributed, tokenizer: Tokenizer | None = None,
                    notes: dict | None = None) -> None:
    """Optimizer state first (every rank), then the tokenizer when given, the metrics, and meta and weights
    (rank 0) last. `notes`: facts of the caller's kept in the meta (the command line's flags)."""
    state = {"optimizers": [o.state_dict() for o in opts]}
    write_atomic(optimizer_path(directory, step, env.rank), lambda f: torch.save(state, f))
    if env.rank == 0:
        if tokenizer is not None:
            tokenizer.save(directory / "tokenizer")
        write_json(directory / "metrics.json", metrics)
        nanochat.save(model, directory, step, meta={"train_config": cfg.to_dict(), "loader": loader.state_dict(),
                                                    "world_size": env.world, **(notes or {})})


RESUME_MAY_CHANGE = ("steps", "save_every", "keep_checkpoints")  # how far and how often, not what is trained


@dataclass(frozen=True)
class Resumed:
    """Where a restored run continues: its next step, and its metrics so far."""

    step: int
    metrics: dict


def restore(directory: Path, cfg: TrainConfig, model: GPT, opts, loader: TokenLoader, env: Distributed) -> Resumed:
    """Load the latest checkpoint of `directory` into the model, optimizers and loader."""
    available = nanochat.steps(directory)
    if not available:
        raise FileNotFoundError(f"--resume: no checkpoint in {directory}; start without --resume")
    step = available[-1]
    meta = json.loads(nanochat.paths(directory, step)[1].read_text())
    saved, current = meta.get("train_config", {}), cfg.to_dict()
    differing = sorted(k for k in set(saved) | set(current)
                       if k not in RESUME_MAY_CHANGE and saved.get(k) != current.get(k))
    if differing:
        raise ValueError(f"--resume: the checkpoint in {directory} was trained with another config (differing: "
                         f"{differing}); resume with the same settings, or train into a new --out directory")
    model.load_state_dict(nanochat.load(directory, step, device=env.device).state_dict())
    path = optimizer_path(directory, step, env.rank)
    try:  # optimizer states are tensors, numbers and containers: weights_only reads them and runs no pickled code
        state = torch.load(path, map_location=env.device, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint of step {step} has no optimizer state for rank "
                              f"{env.rank}; was it trained with {env.world} processes?)") from None
    except Exception as err:  # truncated or foreign bytes raise several types
        raise CheckpointError(f"{path}: corrupt or not an optimizer checkpoint ({type(err).__name__})") from None
    for opt, s in zip(opts, state["optimizers"]):
        opt.load_state_dict(s)
    loader.load_state_dict(meta["loader"])
    metrics = json.loads((directory / "metrics.json").read_text())
    metrics["train"] = [r for r in metrics["train"] if r["step"] < step]
    metrics["evals"] = [r for r in metrics["evals"] if r["step"] <= step]
    metrics["skipped_steps"] = sum(r["skipped"] for r in metrics["train"])
    return Resumed(step, metrics)
