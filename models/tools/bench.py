"""Prefill benchmark: wall time of the sequential forward against SNLP plans on one model (not a test).

Both paths run eagerly with the same kernels (torch SDPA, no compile, no CUDA graphs). On a GPU the timings use
CUDA events after warm-up; on the CPU, perf_counter. The JSON records the device, versions, shapes, warm-up and
repeat counts, and the median and spread of every row."""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass

import torch

import layersolve as ls

from ..inference import snlp
from ..nanochat.gpt import GPT


@dataclass(frozen=True)
class Case:
    name: str
    plan: snlp.Plan | None  # None: the sequential forward


def default_cases(n_layer: int) -> list[Case]:
    half = n_layer // 2
    return [Case("sequential", None),
            Case(f"Jacobi n{half} K1", snlp.Plan(n_par=half, jacobian=ls.Zero(), iters=1)),
            Case(f"IDN n{half} K1", snlp.Plan(n_par=half, iters=1)),
            Case(f"IDN n{half} K2", snlp.Plan(n_par=half, iters=2)),
            Case(f"IDN n{n_layer} K1", snlp.Plan(n_par=n_layer, iters=1)),
            Case(f"IDN {half // 2}xF2 K1", snlp.Plan(n_par=half, fuse=2, iters=1)),
            Case(f"IDN 1xF{half} K1", snlp.Plan(n_par=half, fuse=half, iters=1))]


def _timer(device: torch.device):
    if device.type == "cuda":
        def timed(fn):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop) / 1e3
    else:
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
    return timed


@torch.no_grad()
def run(model: GPT, idx: torch.Tensor, cases: list[Case], warmup: int = 3, repeats: int = 10,
        progress=print) -> dict:
    """Time every case; quality columns compare each plan's logits with the sequential forward's."""
    timed = _timer(idx.device)
    reference = model(idx)
    rows = []
    for i, case in enumerate(cases, start=1):
        def call():
            return model(idx) if case.plan is None else snlp.forward(model, idx, case.plan, throw=False).logits
        for _ in range(warmup):
            call()
        times = [timed(call) for _ in range(repeats)]
        logits = call()
        row = {"case": case.name, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
               "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
               "max_abs_logit_diff": float((logits - reference).abs().max())}
        rows.append(row)
        progress(f"[{i}/{len(cases)}] {case.name}: {row['median_s'] * 1e3:.1f} ms")
    base = rows[0]["median_s"]
    for row in rows:
        row["speedup"] = base / row["median_s"]
    device = torch.cuda.get_device_name(idx.device) if idx.device.type == "cuda" else platform.processor() or "cpu"
    return {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "shape": {"batch": idx.shape[0], "tokens": idx.shape[1]}, "model_config": model.config.__dict__,
            "dtype": str(model.dtype), "warmup": warmup, "repeats": repeats,
            "treatment": "eager for both paths: same kernels, no compile, no CUDA graphs", "rows": rows}


def table(results: dict) -> str:
    lines = [f"prefill, batch {results['shape']['batch']} x {results['shape']['tokens']} tokens on {results['device']} "
             f"({results['dtype']}, {results['threads']} threads, median of {results['repeats']})",
             f"{'case':<18} {'median ms':>10} {'spread ms':>12} {'speedup':>8} {'top-1 agr':>10} {'max |dlogit|':>13}"]
    for r in results["rows"]:
        spread = f"{r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}"
        lines.append(f"{r['case']:<18} {r['median_s'] * 1e3:>10.1f} {spread:>12} {r['speedup']:>7.2f}x "
                     f"{r['top1_agreement']:>10.3f} {r['max_abs_logit_diff']:>13.2e}")
    return "\n".join(lines)


def train_step_times(cfg, modes: dict, batch: tuple[torch.Tensor, torch.Tensor], warmup: int = 2,
                     repeats: int = 5, progress=print) -> dict:
    """Median wall time of the training loop's step (`training.step.train_step`: forward under autocast, backward,
    clipping, optimizer steps) for each regularizer setting in `modes` (name -> TrainConfig), on one fixed batch at
    step 0; ratios against the first."""
    import dataclasses as dc

    from ..nanochat.gpt import GPT
    from ..training.optim import optimizers
    from ..training.step import StepLoss, train_step

    x, y = batch
    rows = []
    for i, (name, mode_cfg) in enumerate(modes.items(), start=1):
        model = GPT(mode_cfg.model).to(x.device)
        model.init_weights(seed=0, output_std=0.02)
        objective, opts = StepLoss(model, mode_cfg), optimizers(model, mode_cfg)
        timed = _timer(x.device)

        def step():
            train_step(objective, opts, mode_cfg, x, y, 0)

        for _ in range(warmup):
            step()
        times = [timed(step) for _ in range(repeats)]
        rows.append({"mode": name, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)})
        progress(f"[{i}/{len(modes)}] {name}: {rows[-1]['median_s']:.3f} s/step")
    for row in rows:
        row["ratio"] = row["median_s"] / rows[0]["median_s"]
    return {"device": str(x.device), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "batch": list(x.shape), "model_config": dc.asdict(cfg.model), "warmup": warmup, "repeats": repeats,
            "rows": rows}
