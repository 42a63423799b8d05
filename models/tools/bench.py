"""Benchmark building blocks (not tests): where a measurement ran, a timer, prefill rows of the sequential forward
against SNLP plans, the suite's table, and training-step times. The suite itself (presets, decoding, baselines,
roofline) is suite.py.

On a GPU the timings use CUDA events after warm-up; on the CPU, perf_counter. Medians and spreads over repeats."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Mapping

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
    env["commit"] = commit()
    return env


def commit() -> str | None:
    """The git commit of the code that measured (with "+dirty" when the tracked files differ from it), or None
    outside a git checkout: every committed result says what code it came from."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if head.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty else "")


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


def timer(device: torch.device):
    """A function that runs fn() and returns its wall time in seconds (CUDA events after the work on GPU)."""
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


def interleaved(calls: Mapping[str, Callable[[], object]], timed, warmup: int, repeats: int) -> dict[str, list]:
    """Seconds per call of each named call: `warmup` untimed calls each, then `repeats` rounds of one timed call
    of each in turn, so that a drift in the machine's speed falls on every call alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call))
    return times


@torch.inference_mode()
def prefill_rows(model: GPT, idx: torch.Tensor, plans: Mapping[str, snlp.Plan], warmup: int = 2, repeats: int = 5,
                 progress=print) -> list[dict]:
    """Time the eager sequential forward (the first row, "sequential") and every named plan. Repeats are
    interleaved over the cases (one call of each in turn), so that a drift in the machine's speed (other work,
    clock changes) falls on every case alike, not on whichever ran then. Quality columns compare each plan's
    logits with the sequential forward's; a plan's row carries "result", the name of its solve's `ls.Result` (a
    solve that does not end ok keeps its row and its timing, but its logits are not the model's), and "plan", the
    plan object (for the caller's work model; not JSON)."""
    if SEQUENTIAL in plans:
        raise ValueError(f"plans: the name {SEQUENTIAL!r} is the sequential forward's row; name the plan otherwise")
    timed = timer(idx.device)
    reference = model(idx)
    cases = {SEQUENTIAL: None, **plans}

    def caller(plan):
        def call():
            if plan is None:
                return model(idx), None
            out = snlp.forward(model, idx, plan, throw=False)
            return out.logits, out.result
        return call

    calls = {name: caller(plan) for name, plan in cases.items()}
    times = interleaved(calls, timed, warmup, repeats)
    rows = []
    for name, plan in cases.items():
        if idx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(idx.device)
        logits, result = calls[name]()
        row = {"case": name, "plan": plan, "median_s": statistics.median(times[name]), "min_s": min(times[name]),
               "max_s": max(times[name]),
               "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
               "max_abs_logit_diff": float((logits.float() - reference.float()).abs().max())}
        if idx.device.type == "cuda":
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(idx.device)
        if result is not None:
            row["result"] = result.name
        rows.append(row)
        progress(f"  {name}: {row['median_s'] * 1e3:.1f} ms, solve {_outcome(row)}")
    return rows


def speedups(model: GPT, idx: torch.Tensor, plans: Mapping[str, snlp.Plan], warmup: int = 2, repeats: int = 7,
             progress=print) -> dict:
    """The speed of every plan beside the eager sequential forward on `idx` (B, T), by `prefill_rows`: the one
    timing method of `snlp eval`, `snlp study`, the demo and `snlp bench`. Returns the baseline's description, the
    repeats, and per case ("sequential" and each plan) the median, min and max seconds, the speedup over the
    baseline and how the solve ended."""
    rows = prefill_rows(model, idx, plans, warmup, repeats, progress)
    base = rows[0]["median_s"]
    return {"baseline": f"eager {SEQUENTIAL} forward (batch {idx.shape[0]} x {idx.shape[1]} tokens, this machine)",
            "repeats": repeats,
            "rows": {r["case"]: {"median_s": r["median_s"], "min_s": r["min_s"], "max_s": r["max_s"],
                                 "speedup": base / r["median_s"], "result": r.get("result")} for r in rows}}


def failed(row: dict) -> bool:
    """Whether a plan's solve did not end ok (the sequential rows have no solve)."""
    return "result" in row and not ls.Result[row["result"]].ok


def _outcome(row: dict) -> str:
    if "result" not in row:
        return "-"
    return f"{FAILED_MARK} {row['result']}" if failed(row) else row["result"]


FAILED_NOTE = (f"{FAILED_MARK}: the solve did not end ok (diverged, non-finite, or short of its tolerance): its "
               "logits are not the model's, so its time is not the model's either")


def table(results: dict) -> str:
    """The suite's rows as text, a prefill and a decode table per shape, with each row's speedup over the baselines
    it names, its accuracy, its measured time over the roofline bound, and how its solve ended (marked when not
    ok, with a note under the table)."""
    lines = [f"{results['device']} ({results['dtype']}, {results['threads']} threads, torch {results['torch']}, "
             f"median of {results['repeats']}); matmul {results['rates']['matmul_flops'] / 1e9:.0f} GFLOP/s, copy "
             f"{results['rates']['copy_bytes'] / 1e9:.1f} GB/s"]
    any_failed = False
    for shape in results["shapes"]:
        s = shape["shape"]
        for kind, unit, accuracy in (("prefill", "ms", "top-1 agr"), ("decode", "ms/tok", "tok agr")):
            rows = shape[kind]
            baselines = list(rows[0]["speedup"])
            lines += ["", f"{kind}: L{s['layers']} D{s['width']} T{s['tokens']}",
                      f"{'case':<34} {unit:>8} {'spread':>15} " + " ".join(f"{'x ' + b:>10}" for b in baselines)
                      + f" {accuracy:>9} {'max|dlogit|':>11} {'roofline':>8}  solve"]
            for r in rows:
                quality = r.get("top1_agreement", r.get("token_agreement"))
                diff = r.get("max_abs_logit_diff")
                lines.append(
                    f"{r['case']:<34} {r['median_s'] * 1e3:>8.2f} {r['min_s'] * 1e3:>7.2f}-{r['max_s'] * 1e3:<7.2f} "
                    + " ".join(f"{'-':>10}" if r["speedup"][b] is None else f"{r['speedup'][b]:>9.2f}x"
                               for b in baselines)
                    + f" {'' if quality is None else f'{quality:.3f}':>9} {'' if diff is None else f'{diff:.1e}':>11}"
                    f" {r['bound_s'] / r['median_s'] if 'bound_s' in r else float('nan'):>7.0%}  {_outcome(r)}")
                any_failed |= failed(r)
        if shape.get("speculative"):
            lines += ["", f"speculative decoding: L{s['layers']} D{s['width']}, batch 1", *speculative_table(
                shape["speculative"])]
    if any_failed:
        lines.append(FAILED_NOTE)
    lines.append("x eager / x compiled: speedup over the eager / compiled sequential path; roofline: the row's "
                 "time bound (FLOPs / matmul rate, bytes / copy rate) over its measured time")
    return "\n".join(lines)


def speculative_table(rows: list[dict]) -> list[str]:
    """Lines of speculative rows (speculation.speculative_rows): time per token, tokens/s, acceptance, tokens per
    round, speedup over sequential decoding at the same temperature, and at temperature 0 whether the tokens are
    sequential greedy decoding's."""
    lines = [f"{'case':<40} {'ms/tok':>8} {'spread':>15} {'tok/s':>8} {'accept':>7} {'tok/rnd':>7} {'x seq':>7}"
             f"  = greedy"]
    for r in rows:
        accept, length, equal = r["acceptance_rate"], r["mean_accepted_length"], r["greedy_equal"]
        lines.append(f"{r['case']:<40} {r['median_s'] * 1e3:>8.2f} {r['min_s'] * 1e3:>7.2f}-{r['max_s'] * 1e3:<7.2f} "
                     f"{r['tokens_per_s']:>8.1f} {'' if accept is None else f'{accept:.3f}':>7} "
                     f"{'' if length is None else f'{length:.2f}':>7} {r['speedup']:>6.2f}x  "
                     f"{'-' if equal is None else ('yes' if equal else 'NO')}")
    return lines


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
        timed = timer(x.device)

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
