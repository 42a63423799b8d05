"""Prefill benchmark: wall time of the sequential forward against SNLP plans on one model (not a test).

Both paths run eagerly with the same kernels (torch SDPA, no compile, no CUDA graphs). On a GPU the timings use
CUDA events after warm-up; on the CPU, perf_counter. The JSON records the device, versions, shapes, warm-up and
repeat counts, and the median and spread of every row."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Mapping

import torch

import layersolve as ls

from ..inference import snlp
from ..nanochat import GPT

def environment(device: torch.device) -> dict:
    """Where a measurement ran: the device's name (and driver on CUDA), the library versions, the CPU threads."""
    env = {"device": platform.processor() or platform.machine() or "cpu", "torch": torch.__version__,
           "threads": torch.get_num_threads(), "python": platform.python_version()}
    if device.type == "cuda":
        env["device"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
        env["driver"] = _nvidia_driver()
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _nvidia_driver() -> str | None:
    try:
        import subprocess
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


SEQUENTIAL = "sequential"  # the first row of every run: the model's own forward, the reference
FAILED_MARK = "!"


def default_plans(n_layer: int) -> list[snlp.Plan]:
    """Jacobi and IDN over half the layers, IDN over all of them, and the half tail fused into chunks of two
    blocks (where they divide it) and into one chunk (CxFM). n_layer >= 2."""
    half = n_layer // 2
    fusions = sorted({f for f in (2, half) if f > 1 and half % f == 0})
    return [snlp.Plan(n_par=half, jacobian=ls.Zero(), iters=1), snlp.Plan(n_par=half, iters=1),
            snlp.Plan(n_par=half, iters=2), snlp.Plan(n_par=n_layer, iters=1),
            *(snlp.Plan(n_par=half, fuse=f, iters=1) for f in fusions)]


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
def run(model: GPT, idx: torch.Tensor, plans: Mapping[str, snlp.Plan], warmup: int = 3, repeats: int = 10,
        progress=print) -> dict:
    """Time the sequential forward (the first row, "sequential") and every named plan. Quality columns compare
    each plan's logits with the sequential forward's; a plan's row carries "result", the name of its solve's
    `ls.Result` (a solve that does not end ok keeps its row and its timing, but its logits are not the model's)."""
    if SEQUENTIAL in plans:
        raise ValueError(f"plans: the name {SEQUENTIAL!r} is the sequential forward's row; name the plan otherwise")
    timed = _timer(idx.device)
    reference = model(idx)
    cases = {SEQUENTIAL: None, **plans}
    rows = []
    for i, (name, plan) in enumerate(cases.items(), start=1):
        def call():
            if plan is None:
                return model(idx), None
            out = snlp.forward(model, idx, plan, throw=False)
            return out.logits, out.result

        for _ in range(warmup):
            call()
        times = [timed(call) for _ in range(repeats)]
        logits, result = call()
        row = {"case": name, "median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
               "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
               "max_abs_logit_diff": float((logits - reference).abs().max())}
        if result is not None:
            row["result"] = result.name
        rows.append(row)
        progress(f"[{i}/{len(cases)}] {name}: {row['median_s'] * 1e3:.1f} ms, solve {_outcome(row)}")
    base = rows[0]["median_s"]
    for row in rows:
        row["speedup"] = base / row["median_s"]
    return {**environment(idx.device),
            "shape": {"batch": idx.shape[0], "tokens": idx.shape[1]}, "model_config": model.config.__dict__,
            "dtype": str(model.dtype), "warmup": warmup, "repeats": repeats,
            "treatment": "eager for both paths: same kernels, no compile, no CUDA graphs", "rows": rows}


def failed(row: dict) -> bool:
    """Whether a plan's solve did not end ok (the sequential row has no solve)."""
    return "result" in row and not ls.Result[row["result"]].ok


def _outcome(row: dict) -> str:
    if "result" not in row:
        return "-"
    return f"{FAILED_MARK} {row['result']}" if failed(row) else row["result"]


def table(results: dict) -> str:
    """The rows as text, with how each solve ended; a row whose solve did not end ok is marked, and a note under
    the table says what the mark means."""
    lines = [f"prefill, batch {results['shape']['batch']} x {results['shape']['tokens']} tokens on {results['device']} "
             f"({results['dtype']}, {results['threads']} threads, median of {results['repeats']})",
             f"{'case':<26} {'median ms':>10} {'spread ms':>12} {'speedup':>8} {'top-1 agr':>10} {'max |dlogit|':>13}"
             "  solve"]
    for r in results["rows"]:
        spread = f"{r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f}"
        lines.append(f"{r['case']:<26} {r['median_s'] * 1e3:>10.1f} {spread:>12} {r['speedup']:>7.2f}x "
                     f"{r['top1_agreement']:>10.3f} {r['max_abs_logit_diff']:>13.2e}  {_outcome(r)}")
    if any(failed(r) for r in results["rows"]):
        lines.append(f"{FAILED_MARK}: the solve did not end ok (diverged, non-finite, or short of its tolerance): its "
                     "logits are not the model's, so its time is not the model's either")
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
    return {**environment(x.device),
            "batch": list(x.shape), "model_config": dc.asdict(cfg.model), "warmup": warmup, "repeats": repeats,
            "rows": rows}
