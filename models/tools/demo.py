"""The demos. `run_toy`: every Jacobian strategy on one random stack of residual MLP blocks, to exactness: every
solve reaches the sequential trace in at most L iterations, surrogates that match the blocks' structure need fewer,
exact Newton converges quadratically. `run_models` (the main job, `snlp demo`): train a baseline and an
IDN-regularized model on the embedded corpus with the same seed and tokens, then evaluate Jacobi and IDN at
K = 1, 2, 4 over the last half of the layers, and write a report with plots."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import layersolve as ls
from analysis import convergence_record, convergence_table, plot_convergence

from ..io import save_figure, write_json
from . import study
from .names import n_par_configs


@dataclass(frozen=True)
class ToyConfig:
    layers: int = 24
    width: int = 32
    batch: int = 8
    residual_scale: float = 0.9  # a_l of h -> a_l h + g(h): Scaled(a) is then exact on the skip path
    branch_gain: float = 0.4
    seed: int = 0


def toy_system(cfg: ToyConfig) -> tuple[ls.LayerSystem, torch.Tensor]:
    """Blocks h -> a h + gain * W2 relu(W1 h) / sqrt(width) on states (batch, width), float64."""
    g = torch.Generator().manual_seed(cfg.seed)
    w1 = torch.randn(cfg.layers, 2 * cfg.width, cfg.width, generator=g, dtype=torch.float64) / cfg.width**0.5
    w2 = torch.randn(cfg.layers, cfg.width, 2 * cfg.width, generator=g, dtype=torch.float64) / (2 * cfg.width)**0.5
    scales = torch.full((cfg.layers,), cfg.residual_scale, dtype=torch.float64)

    def block(p, h):  # h: (batch, width)
        return p["a"] * h + cfg.branch_gain * torch.relu(h @ p["w1"].T) @ p["w2"].T

    system = ls.LayerSystem.from_function(block, {"w1": w1, "w2": w2, "a": scales}, scales=scales)
    h0 = torch.randn(cfg.batch, cfg.width, generator=g, dtype=torch.float64)
    return system, h0


SOLVERS = {
    "Jacobi": ls.Jacobi(),
    "Identity (IDN)": ls.Newton(jacobian=ls.Identity()),
    "Scaled (true a)": ls.Newton(jacobian=ls.Scaled()),
    "Diagonal (4 probes)": ls.Newton(jacobian=ls.Diagonal(probes=4)),
    "Exact (GMRES)": ls.Newton(jacobian=ls.Exact(method=ls.GMRES())),
}


def run_toy(out_dir: Path, cfg: ToyConfig = ToyConfig(), tol: float = 1e-10) -> dict:
    system, h0 = toy_system(cfg)
    reference = system.sequential(h0)
    runs, rows = {}, []
    for i, (name, solver) in enumerate(SOLVERS.items(), start=1):
        start = time.perf_counter()
        sol = ls.solve(system, h0, solver, tol=tol, reference=reference, throw=False)
        seconds = time.perf_counter() - start
        runs[name] = sol.stats
        rows.append({"solver": name, "result": sol.result.name, "seconds": seconds, **convergence_record(sol.stats)})
        print(f"[{i}/{len(SOLVERS)}] {name:<20} {sol.result.name:<10} iterations={sol.stats.iterations:>3} "
              f"final error={float(sol.stats.error[-1].max()):.1e}  ({seconds:.2f} s)", flush=True)
    print()
    print(convergence_table(runs))
    results = {"config": cfg.__dict__, "tol": tol, "runs": rows}
    write_json(out_dir / "toy.json", results)  # not demo.json: never the main job's results, whatever --out says
    save_figure(plot_convergence(runs, title=f"{cfg.layers} residual blocks, width {cfg.width}: error vs sequential"),
                out_dir / "toy_convergence.png")
    print(f"\nwrote {out_dir / 'toy.json'} and {out_dir / 'toy_convergence.png'}")
    return results


def regularizer_of(n_layer: int):
    """The demo's regularizer: IDN at n_par = L/4 and L/2, every step."""
    from ..training.regularizer import Regularizer

    return Regularizer(ls.Identity(), n_par_configs(n_layer, quarters=(1, 2)), stride=1)


def trained_pair(cfg, regularizer, reg_lambda: float, cache_dir: Path, progress=print):
    """The demo's two runs of `cfg` (a TrainConfig), without and with the regularizer, each trained or reused from
    cache_dir when its config, data and code are unchanged; with the corpus and its validation plays."""
    from ..training.config import model_shapes
    from ..training.loop import Data
    from ..training.runs import pair, trained_runs

    configs = pair(cfg, regularizer, reg_lambda)
    shapes = model_shapes(cfg.model)  # before any work: a run or a study plan the model cannot take fails now
    for run_cfg in configs.values():
        run_cfg.check()
    for plan in study.study_plans(cfg.model).values():
        plan.check(shapes)
    data = Data.prepare(None, cfg.model.vocab_size, cache_dir)
    return trained_runs(configs, data, cache_dir, progress=progress), data, data.validation(cfg)


def run_models(out_dir: Path, cfg, regularizer, reg_lambda: float, cache_dir: Path,
               study_cfg: study.StudyConfig = study.StudyConfig(), progress=print) -> dict:
    """Train both models (`trained_pair`), then study them on the validation plays (`study.run`): demo.json,
    report.md and the figures in out_dir."""
    from ..training import evaluate

    trained, data, validation = trained_pair(cfg, regularizer, reg_lambda, cache_dir, progress)
    unigram = evaluate.unigram_loss(data.train, validation)
    models = {name: run.model() for name, run in trained.items()}
    training = {name: run.metrics for name, run in trained.items()}
    runs = {name: {"directory": str(run.directory), "reused": run.reused,
                   "final_train_loss": run.metrics["train"][-1]["ce"], "evals": run.metrics["evals"]}
            for name, run in trained.items()}
    about = {"train_config": cfg.to_dict(), "regularizer": repr(regularizer), "reg_lambda": reg_lambda,
             "unigram_loss": unigram, "unigram_ppl": math.exp(unigram), "runs": runs}
    results = study.run(models, validation, out_dir, baseline="baseline", training=training, cfg=study_cfg,
                        about=about, name="demo", progress=progress)
    progress("\n" + study.summary(results))
    progress(f"wrote {out_dir / 'report.md'}, demo.json and {', '.join(results['figures'])}")
    return results
