"""The convergence study of `snlp study` and `snlp demo`: on one or more trained models, the evaluation grid of
SNLP plans (quality against the sequential forward), the solves' convergence against the sequential trace, and each
plan's measured speed with the benchmark suite's timing; then figures, the paper's claims beside ours
(`claims.py`), and a report.

Plans, at n = L/2 unless named: Jacobi and IDN with K = 1, 2, 4 below n and K = n (where every strategy is exact,
finite termination), and for the frontier IDN K = 1 from one_step, IDN over all L layers, and (n/2)xF2 K1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

import layersolve as ls
import analysis

from ..inference import snlp
from ..io import save_figure, write_atomic, write_json
from ..nanochat.gpt import GPT, GPTConfig
from ..training.evaluate import Validation, grid, grid_table
from . import claims as claims_table
from .bench import environment, speedups
from .names import plan_name

CONVERGENCE = {"Jacobi": ls.Zero(), "IDN": ls.Identity()}  # the strategies of the convergence figures


@dataclass(frozen=True)
class StudyConfig:
    """timing_repeats: timed calls per plan (median), after timing_warmup calls. timing_compile: also time the
    compiled sequential forward, so that the speedups are over the fastest sequential way (False: over eager)."""

    timing_repeats: int = 7
    timing_warmup: int = 2
    timing_compile: bool = True


def iteration_counts(n_par: int) -> list[int]:
    """K = 1, 2, 4 below n_par, and n_par itself (the exact case)."""
    return sorted({k for k in (1, 2, 4) if k < n_par} | {n_par})


def study_plans(config: GPTConfig) -> dict[str, snlp.Plan]:
    """The study's plans for a model of `config` (no fused plan for mHC, whose hyper-connections do not fuse)."""
    n_layer = config.n_layer
    half = max(1, n_layer // 2)
    plans = [snlp.Plan(n_par=half, jacobian=j, iters=k) for j in CONVERGENCE.values() for k in iteration_counts(half)]
    plans += [snlp.Plan(n_par=half, iters=1, init="one_step"), snlp.Plan(n_par=n_layer, iters=1)]
    if half % 2 == 0 and half >= 4 and not config.use_mhc:
        plans.append(snlp.Plan(n_par=half, iters=1, fuse=2))
    return {plan_name(p): p for p in plans}


@torch.no_grad()
def convergence(model: GPT, validation: Validation) -> dict[str, ls.Stats]:
    """Each strategy's solve of the last n = L/2 layers for n iterations, against the sequential trace, on the
    grid's validation batches: the worst over them (`ls.Stats.worst`). Its iterate k is the grid's K = k plan, so
    the figures, the claims and the grid's max layer err are one set of numbers."""
    half = max(1, model.config.n_layer // 2)
    device = model.lm_head.weight.device
    runs = {}
    for label, jacobian in CONVERGENCE.items():
        plan = snlp.Plan(n_par=half, jacobian=jacobian, iters=half)
        per_batch = [snlp.forward(model, x, plan, throw=False, reference=snlp.sequential_trace(model, x, plan)[1])
                     for x, _ in validation.batches(device)]
        runs[label] = ls.Stats.worst(out.stats for out in per_batch)
    return runs


def run(models: Mapping[str, GPT], validation: Validation, out_dir: str | Path, baseline: str | None = None,
        training: Mapping[str, dict] | None = None, cfg: StudyConfig = StudyConfig(), about: dict | None = None,
        name: str = "study", progress: Callable[[str], None] = print) -> dict:
    """Study every model; write <name>.json, the figures and report.md into out_dir; return the results.
    baseline: the name of the unregularized model, for the regularization claim (None: it is not assessed).
    training: per model, its training metrics (metrics.json), for the training-curves figure. about: facts of
    the caller's (configs, where the models came from), kept in the JSON under "about"."""
    if baseline is not None and baseline not in models:
        raise ValueError(f"baseline={baseline!r} is not one of the models {sorted(models)}")
    out_dir = Path(out_dir)
    x, _ = next(iter(validation.batches()))
    results = {"about": about or {}, "environment": environment(x.device), "context": validation.seq_len,
               "tokens": validation.max_tokens, "sequences": sum(len(x) for x, _ in validation.batches()),
               "baseline": baseline, "models": {}}
    stats = {}
    for label, model in models.items():
        model.eval()
        plans = study_plans(model.config)
        progress(f"== {label}: evaluation grid ({len(plans)} plans)")
        rows = grid(model, validation, plans, progress)
        progress(f"== {label}: convergence and speed")
        stats[label] = convergence(model, validation)
        results["models"][label] = {
            "n_layer": model.config.n_layer, "n_par": max(1, model.config.n_layer // 2), "grid": rows,
            "convergence": {k: analysis.convergence_record(s) for k, s in stats[label].items()},
            # batch 1: the latency case, where layer parallelism pays (docs/study.md)
            "speed": speedups(model, x[:1], plans, cfg.timing_warmup, cfg.timing_repeats, progress,
                                       cfg.timing_compile)}
    results["claims"] = claims_table.assess(results)
    figures = write_figures(results, stats, training or {}, out_dir)
    results["figures"] = sorted(figures)
    write_json(out_dir / f"{name}.json", results)
    text = report(results)
    write_atomic(out_dir / "report.md", lambda f: f.write(text.encode()))
    return results


def write_figures(results: dict, stats: Mapping[str, Mapping[str, ls.Stats]], training: Mapping[str, dict],
                  out_dir: Path) -> dict[str, str]:
    """The report's figures as PNG files in out_dir: {file name: what it shows}."""
    runs = {f"{model}: {label}": s for model, per in stats.items() for label, s in per.items()}
    over = f"worst over the grid's {results['sequences']} validation sequences"
    figures = {
        "convergence.png": analysis.plot_convergence(runs, title=f"last-half solve vs the sequential trace ({over})"),
        "frontier.png": analysis.plot_frontier(frontier(results), "validation perplexity", baseline="fastest sequential"),
        "prefix.png": analysis.plot_prefix_front(runs, title=f"exact prefix of the last-half solve ({over})"),
    }
    for model, per in stats.items():
        n_layer = results["models"][model]["n_layer"]
        figures[f"heatmap-{model}.png"] = analysis.plot_heatmap(
            per["IDN"], "residual", title=f"{model}: IDN residual per layer and iteration ({over})",
            first_layer=n_layer - per["IDN"].num_layers + 1)
    if training:
        figures["training.png"] = analysis.plot_training(training)
    for file, fig in figures.items():
        save_figure(fig, out_dir / file)
    return {file: file for file in figures}


def _validation_text(results: dict) -> str:
    quality = next(iter(results["models"].values()))["grid"]["sequential"]["quality"]
    return (f"Perplexities are over {quality['tokens']:,} validation text tokens in {results['sequences']} sequences "
            f"of {quality['context']} tokens (the context).")


def frontier(results: dict) -> list:
    """Frontier points of every model: each plan's validation perplexity against its measured speedup."""
    points = []
    for name, model in results["models"].items():
        measured = {plan: row["speedup"] for plan, row in model["speed"]["rows"].items()}
        points += analysis.frontier_points(model["grid"], measured, group=name)
    return points


def summary(results: dict) -> str:
    """The printed summary: each claim's verdict and our figure, then each model's grid."""
    lines = [_validation_text(results), "", "claims of the paper against this run:"]
    for row in results["claims"]:
        lines += [f"  [{claims_table.verdict(row['agrees'])}] {row['claim']}", f"      ours: {row['ours']}"]
    for label, model in results["models"].items():
        lines += ["", f"{label}:", grid_table(model["grid"], model["speed"])]
    return "\n".join(lines)


def report(results: dict) -> str:
    """report.md: the claims table first, then each model's grid and the figures."""
    env = results["environment"]
    lines = ["# SNLP study", "", f"Measured on {env['device']} ({env['threads']} threads), torch {env['torch']}, "
             f"code at commit {env['commit'] or 'unknown (not a git checkout)'}. {_validation_text(results)}", "",
             claims_table.table(results["claims"]), ""]
    for name, model in results["models"].items():
        speed = model["speed"]
        lines += [f"## {name} ({model['n_layer']} layers; a plan solves its last n layers, nN in its name)", "", "```",
                  grid_table(model["grid"], speed), "```", "", f"Measured speed (baseline: {speed['baseline']}):", "",
                  "```"]
        lines += [f"{plan:<28} {row['median_s'] * 1e3:8.2f} ms  {row['speedup']:5.2f}x"
                  for plan, row in speed["rows"].items()]
        lines += ["```", ""]
    lines += ["## Figures", ""] + [f"![{file}]({file})" for file in results.get("figures", [])]
    return "\n".join(lines) + "\n"

