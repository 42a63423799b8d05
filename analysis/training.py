"""Training curves from a run's metrics.json ({"train": [{"step", "loss", "ce", "reg", "skipped", "seconds"}, ...],
"evals": [{"step", "loss", "ppl", "bpb"}, ...]}): the loss and the SNLP regularizer against steps, one curve per
run, with the validation loss as points, so runs with and without a regularizer can be read side by side."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ._plot import figure, style


@dataclass(frozen=True, eq=False)
class TrainingCurves:
    """One run's curves as float64 arrays. step, loss (ce + lambda reg), ce, reg, seconds: per training step;
    skipped: the steps that made no update (their solve did not end ok). eval_*: per validation evaluation."""

    step: np.ndarray
    loss: np.ndarray
    ce: np.ndarray
    reg: np.ndarray
    seconds: np.ndarray
    skipped: np.ndarray
    eval_step: np.ndarray
    eval_loss: np.ndarray
    eval_ppl: np.ndarray
    eval_bpb: np.ndarray


def _column(records, key: str, dtype=np.float64) -> np.ndarray:
    """One key of every record; a record without it (an older log) gives NaN (False for flags)."""
    missing = False if dtype is bool else np.nan
    return np.array([r.get(key, missing) for r in records], dtype=dtype)


def training_curves(metrics: Mapping) -> TrainingCurves:
    """The curves of one metrics dict (a missing "evals" is no evaluations)."""
    train, evals = metrics.get("train", []), metrics.get("evals", [])
    return TrainingCurves(
        *(_column(train, key) for key in ("step", "loss", "ce", "reg", "seconds")), _column(train, "skipped", bool),
        *(_column(evals, key) for key in ("step", "loss", "ppl", "bpb")))


def plot_training(runs: Mapping[str, Mapping], title: str = ""):
    """Left: training cross-entropy per step (a line per run), skipped steps as crosses, validation loss as
    points of the same colour. Right: the regularizer per step (flat 0 for a run without one)."""
    fig, (left, right) = figure(ncols=2)
    for i, (name, metrics) in enumerate(runs.items()):
        c, color = training_curves(metrics), f"C{i}"
        left.plot(c.step, c.ce, color=color, linewidth=1, label=f"{name}: train")
        if c.skipped.any():
            left.plot(c.step[c.skipped], c.ce[c.skipped], "x", color=color, label=f"{name}: skipped steps")
        if len(c.eval_step):
            left.plot(c.eval_step, c.eval_loss, "o", color=color, markersize=5, label=f"{name}: validation")
        right.plot(c.step, c.reg, color=color, linewidth=1, label=name)
    style(left, "training step", "cross-entropy loss (nats per token)", title)
    style(right, "training step", "regularizer (unweighted)", "SNLP regularizer")
    return fig
