"""Trained runs kept for reuse: `cached_run` trains a config once and hands back the same run on the next call.

A run is found by a key over everything that decides what training produces: the config, the training tokens
and tokenizer, and the code version (a hash of the source of layersolve, models.nanochat and models.training, and
the torch version). Change any of them and the key changes, so a stale run is never reused. A run is trained in a
temporary directory and renamed into place when complete: an interrupted run leaves nothing that looks reusable.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping

import torch

import layersolve

from .. import nanochat
from ..nanochat import checkpoint
from ..nanochat.gpt import GPT
from .config import TrainConfig
from .loop import Data, train
from .regularizer import Regularizer

SOURCES = tuple(Path(package.__file__).resolve().parent for package in (layersolve, nanochat)) + (
    Path(__file__).resolve().parent,)


def default_cache() -> Path:
    """Where tokenizers, token streams and trained runs are kept when no folder is given: $SNLP_CACHE, else
    $XDG_CACHE_HOME/snlp (~/.cache/snlp). An absolute place, so that the command line and a notebook started from
    any folder share one cache."""
    if os.environ.get("SNLP_CACHE"):
        return Path(os.environ["SNLP_CACHE"]).expanduser().resolve()
    return (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "snlp").expanduser().resolve()


@lru_cache(maxsize=None)
def code_version() -> str:
    """A hash of the training code's source files (their paths and contents) and of the torch version."""
    digest = hashlib.blake2b(torch.__version__.encode(), digest_size=8)
    for folder in SOURCES:
        for path in sorted(folder.rglob("*.py")):
            digest.update(str(path.relative_to(folder.parent)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_key(cfg: TrainConfig, data: Data) -> str:
    digest = hashlib.blake2b(json.dumps(cfg.to_dict(), sort_keys=True).encode(), digest_size=10)
    digest.update(data.tokenizer.fingerprint.encode())
    digest.update(data.train.tokens.numpy().tobytes())
    digest.update(code_version().encode())
    return digest.hexdigest()


def cached_run(cfg: TrainConfig, data: Data, cache_dir: str | Path, name: str,
               show_progress: bool = True) -> tuple[Path, dict, bool]:
    """The run directory of `cfg` trained on `data` (model checkpoint, metrics.json, tokenizer/), its metrics, and
    whether it was reused. Trains it when no complete run of the same key is in `cache_dir/runs`."""
    final = Path(cache_dir) / "runs" / f"{name}-{run_key(cfg, data)}"
    metrics_path = final / "metrics.json"
    if metrics_path.exists() and checkpoint.steps(final):
        return final, json.loads(metrics_path.read_text()), True
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        metrics = train(cfg, data, tmp, show_progress=show_progress)
        shutil.rmtree(final, ignore_errors=True)  # an incomplete directory of the same key, from a crash
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final, metrics, False


@dataclass(frozen=True)
class Trained:
    """A run of `cached_run`: its directory, its metrics (metrics.json) and whether it was reused."""

    directory: Path
    metrics: dict
    reused: bool

    def model(self) -> GPT:
        """The run's final model, in eval mode."""
        return nanochat.load(self.directory).eval()


REG_LAMBDA = 1.0  # the demo pair's regularizer weight by default (`snlp demo --reg-lambda`)


def pair(cfg: TrainConfig, regularizer: Regularizer, reg_lambda: float) -> dict[str, TrainConfig]:
    """The demo's two runs: `cfg` as it is, and with the regularizer (same seed, same tokens)."""
    return {"baseline": cfg,
            "idn-regularized": dataclasses.replace(cfg, regularizer=regularizer, reg_lambda=reg_lambda)}


def trained_runs(configs: Mapping[str, TrainConfig], data: Data, cache_dir: str | Path, show_progress: bool = True,
                 progress=print) -> dict[str, Trained]:
    """Each config trained on `data` (or its identical run reused), by name."""
    runs = {}
    for name, cfg in configs.items():
        progress(f"== {name}: training {cfg.steps} steps (or reusing an identical run)")
        runs[name] = Trained(*cached_run(cfg, data, cache_dir, name, show_progress))
        progress(f"== {name}: {'reused' if runs[name].reused else 'trained'} {runs[name].directory}")
    return runs
