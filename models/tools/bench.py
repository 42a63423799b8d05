"""Benchmark building blocks (not tests): where a measurement ran, a timer, prefill rows of the sequential forward
against SNLP plans, the suite's table, and training-step times. The suite itself (presets, decoding, baselines,
roofline) is suite.py.

On a GPU the timings use CUDA events after warm-up; on the CPU, perf_counter. Medians and spreads over repeats."""

from __future__ import annotations

import copy
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping

import torch

import layersolve as ls

from ..inference import snlp
from ..nanochat import GPT
from ..nanochat.gpt import keep_compiled_variants

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
    of each in turn, so that a drift in the machine's speed falls on every call alike. Rounds alternate direction
    (A B C, then C B A), so that what a call leaves behind (the allocator's free lists, the caches) precedes each
    call as often as it follows it, and neighbours in `calls` run first equally often."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times = {name: [] for name in calls}
    for r in range(repeats):
        for name in (list(calls) if r % 2 == 0 else reversed(list(calls))):
            times[name].append(timed(calls[name]))
    return times


COMPILED = f"{SEQUENTIAL} compiled"  # the model's own forward under torch.compile


def compile_mode(device: torch.device) -> str | None:
    """torch.compile's mode for timing on `device`: CUDA graphs on a GPU ("reduce-overhead"); the default elsewhere."""
    return "reduce-overhead" if device.type == "cuda" else None


def compiled_blocks(model: GPT, device: torch.device) -> GPT:
    """A copy of the model whose blocks run compiled (GPT.compile_blocks, in `compile_mode(device)`): the
    compiled-blocks and graphed rows' model, the eager one left as it is."""
    return copy.deepcopy(model).compile_blocks(compile_mode(device))


@torch.inference_mode()
def prefill_rows(model: GPT, idx: torch.Tensor, plans: Mapping[str, snlp.Plan], warmup: int = 2, repeats: int = 5,
                 progress=print, compile: bool = False) -> list[dict]:
    """Time the eager sequential forward (the first row, "sequential"), with `compile` the compiled one (the second
    row, "sequential compiled", its compile time apart as compile_s: the first call), and every named plan.
    Repeats are interleaved over the cases (one call of each in turn), so that a drift in the machine's speed
    (other work, clock changes) falls on every case alike, not on whichever ran then. Quality columns compare each
    row's logits with the eager sequential forward's; a plan's row carries "result", the name of its solve's
    `ls.Result` (a solve that does not end ok keeps its row and its timing, but its logits are not the model's),
    and "plan", the plan object (for the caller's work model; not JSON)."""
    if {SEQUENTIAL, COMPILED} & set(plans):
        raise ValueError(f"plans: the names {SEQUENTIAL!r} and {COMPILED!r} are the sequential forwards' rows; name "
                         "the plan otherwise")
    timed = timer(idx.device)
    reference = model(idx)
    sequential = {SEQUENTIAL: lambda: (model(idx), None)}
    compile_s = None
    if compile:
        # this process's earlier models compiled the same forward: keep their variants, and compile this shape for
        # itself (dynamo would make a second shape's graph dynamic, slower than eager: 6.3 against 5.2 ms for the
        # trained L6 D64 model after two others; static, 4.1 ms)
        keep_compiled_variants()
        fn = torch.compile(model, mode=compile_mode(idx.device), dynamic=False)
        try:
            compile_s = timed(lambda: fn(idx))
        except Exception as err:  # a model or machine torch.compile cannot handle: eager is the way to run it here
            progress(f"  {COMPILED}: does not compile here ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
        else:
            sequential[COMPILED] = lambda: (fn(idx), None)

    def caller(plan):
        def call():
            out = snlp.forward(model, idx, plan, throw=False)
            return out.logits, out.result
        return call

    calls = {**sequential, **{name: caller(plan) for name, plan in plans.items()}}
    times = interleaved(calls, timed, warmup, repeats)
    rows = []
    for name in calls:
        plan = plans.get(name)
        if idx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(idx.device)
        logits, result = calls[name]()
        row = {"case": name, "plan": plan, "median_s": statistics.median(times[name]), "min_s": min(times[name]),
               "max_s": max(times[name]),
               "top1_agreement": float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
               "max_abs_logit_diff": float((logits.float() - reference.float()).abs().max())}
        if name == COMPILED:
            row["compile_s"], row["mode"] = compile_s, compile_mode(idx.device) or "default"
        if idx.device.type == "cuda":
            row["peak_memory_bytes"] = torch.cuda.max_memory_allocated(idx.device)
        if result is not None:
            row["result"] = result.name
        rows.append(row)
        progress(f"  {name}: {row['median_s'] * 1e3:.1f} ms" + (f" (compile {compile_s:.1f} s)" if name == COMPILED
                                                                 else f", solve {_outcome(row)}"))
    return rows


def fastest(rows: list[dict], names: tuple[str, ...] = (SEQUENTIAL, COMPILED)) -> dict:
    """The row among the sequential ways `names` with the least median time: every speedup's baseline."""
    return min((r for r in rows if r["case"] in names), key=lambda r: r["median_s"])


def speedups(model: GPT, idx: torch.Tensor, plans: Mapping[str, snlp.Plan], warmup: int = 2, repeats: int = 7,
             progress=print, compile: bool = True) -> dict:
    """The speed of every plan beside the fastest sequential way on this machine, by `prefill_rows`: the one
    timing method of `snlp eval`, `snlp plan`, `snlp study`, the demo and `snlp bench --hf`. The baseline is the
    eager or the compiled sequential forward, whichever is faster here (`compile=False`: eager only, and the
    baseline says so). Returns the baseline's description, the repeats, and per case ("sequential", "sequential
    compiled" and each plan) the median, min and max seconds, the speedup over the baseline and how the solve
    ended."""
    rows = prefill_rows(model, idx, plans, warmup, repeats, progress, compile)
    base = fastest(rows)
    shape = f"batch {idx.shape[0]} x {idx.shape[1]} tokens, this machine"
    ms = {r["case"]: r["median_s"] * 1e3 for r in rows}
    if COMPILED in ms:
        baseline = (f"fastest sequential forward: {base['case']} ({shape}; eager {ms[SEQUENTIAL]:.2f} ms, compiled "
                    f"{ms[COMPILED]:.2f} ms)")
    else:
        why = "does not compile here" if compile else "not timed"
        baseline = f"eager {SEQUENTIAL} forward ({shape}; the compiled forward {why})"
    return {"baseline": baseline, "baseline_case": base["case"], "repeats": repeats,
            "rows": {r["case"]: {"median_s": r["median_s"], "min_s": r["min_s"], "max_s": r["max_s"],
                                 "speedup": base["median_s"] / r["median_s"], "result": r.get("result")}
                     for r in rows}}


def failed(row: dict) -> bool:
    """Whether a plan's solve did not end ok (the sequential rows have no solve)."""
    return "result" in row and not ls.Result[row["result"]].ok


def _outcome(row: dict) -> str:
    if "result" not in row:
        return "-"
    return f"{FAILED_MARK} {row['result']}" if failed(row) else row["result"]


FAILED_NOTE = (f"{FAILED_MARK}: the solve did not end ok (diverged, non-finite, or short of its tolerance): its "
               "logits are not the model's, so its time is not the model's either")


# What each column of the suite's tables means: the one source of the tables' headers and of the legend under
# them, which explains exactly the columns printed (a header without an entry here is a KeyError, not a silent gap).
COLUMNS = {
    "case": "the row's computation; by table:",
    "ms": "median over the repeats of the wall time of one forward over the T tokens (batch 1), in milliseconds.",
    "ms/tok": "median over the repeats of the wall time of one generation (the prompt, then the new tokens, KV "
              "caches) divided by the new tokens, in milliseconds per token.",
    "spread": "the fastest and the slowest of the repeats, in the same unit.",
    "x fastest": "speedup over the fastest sequential way of the row's model on this machine, named in the table's "
                 "title: the least median time of its sequential rows (prefill: eager, compiled, compiled blocks; "
                 "the mHC rows their own model's; decoding, speculative or not: eager or graphed, at the same batch "
                 "and sampling) over the row's.",
    "top-1 agr": "the fraction of the T positions whose argmax token is that of the sequential forward of the same "
                 "model.",
    "tok agr": "the fraction of the generated tokens (batch x new tokens, greedy) equal to eager sequential "
               "decoding's at the same batch.",
    "max|dlogit|": "the largest |logit difference| from that sequential forward, over the positions and the "
                   "vocabulary (prefill only: blank on decode rows).",
    "roofline": "the row's time bound over its measured time (100%: at the bound): max(matmul FLOPs / matmul rate, "
                "bytes / copy rate), with the rates of the first line and suite.py's work model (per block "
                "evaluation its matmuls, and bytes: the weights once and passes over the state, bench.json's "
                "byte_model).",
    "solve": "how the plan's solve ended (decode: the worst over the steps): COMPLETED: its K iterations done, no "
             "tolerance set; CONVERGED: exact to rounding (K at least the segment's units); -: sequential, no "
             "solve.",
    "tok/s": "generated tokens per second: 1 / the median ms/tok.",
    "accept": "acceptance rate: the drafted tokens the verifier accepted over the tokens drafted, pooled over the "
              "repeats' rounds; blank for sequential decoding.",
    "tok/rnd": "tokens committed per draft-verify round (the accepted drafts, plus the verifier's own token at a "
               "rejection), pooled over the repeats' rounds: from 1 to B, B when every draft is accepted.",
    "= greedy": "at T0, yes if every repeat's tokens are sequential greedy decoding's (NO otherwise; lossless "
                "speculation makes them equal); - when sampling, where only the distribution is the same.",
}
# The case column: how the rows are named, one note per table, and per kind of row that a table may lack (under
# "case" in the legend, for the tables and rows printed; `_row_notes` says which apply).
CASES = {
    "prefill": "prefill: `sequential` is the model's own forward, the reference; a plan `[<c>xF<f>] <J> n<n> K<K> "
               "<init>` solves the last n blocks in parallel with K Newton iterations and the Jacobian surrogate J "
               "(IDN: identity; HCN: mHC's mixing), from the guess init (repeat: the segment's input state in every "
               "block); <c>xF<f>: as c chunks of f fused blocks; `mHC`: on the mHC twin model.",
    "sequential compiled": "`sequential compiled`: the forward under torch.compile (CUDA graphs on GPU); accuracy "
                           "against the eager forward.",
    "compiled blocks": "`compiled blocks`: on a copy whose blocks run compiled, the compile time apart; accuracy "
                       "against that copy's sequential forward.",
    "decode": "decode b<b> <plan>: greedy decoding of a batch of b prompts with that plan at every step (warm: "
              "each step's solve starts from the previous token's final trace).",
    "graphed": "`graphed`: with compiled blocks and static caches (CUDA graphs on GPU), the compile time apart.",
    "speculative": "speculative T<t> <plan> B<B>: self-speculative decoding of one prompt at temperature t (T0: "
                   "greedy; T1: sampling from the softmax at temperature 1): each round the plan drafts up to B "
                   "tokens (B: the draft length) and the sequential forward verifies them; the plan's guess: repeat "
                   "(the segment's input state) or warm (the previous token's final trace, after each round the "
                   "verifier's exact one); `sequential`: sequential decoding at t (`sequential graphed`: with compiled "
                   "blocks and static caches, the compile time apart).",
}
LEGEND_WIDTH = 118


def _heading(columns: list[tuple[str, str]], printed: list[str]) -> str:
    """A table's header line from (header, format spec) pairs, each header one of COLUMNS; an empty spec: an
    unaligned last column, two spaces after the aligned ones. Appends the headers to `printed`, for the legend."""
    for header, _ in columns:
        if header not in COLUMNS:
            raise KeyError(f"column {header!r} has no legend entry in COLUMNS")
        if header not in printed:
            printed.append(header)
    return " ".join(f"{header:{spec}}" if spec else f" {header}" for header, spec in columns)


def _row_notes(kind: str, rows: list[dict]) -> list[str]:
    """The notes of CASES on the rows of a table of `kind`: the table's own, and those of the rows it has."""
    names = [r["case"] for r in rows]
    optional = {"prefill": {"sequential compiled": lambda n: n.endswith(COMPILED),
                            "compiled blocks": lambda n: n.endswith(" compiled blocks")},
                "decode": {"graphed": lambda n: n.endswith(" graphed")}}.get(kind, {})
    return [kind, *(note for note, has in optional.items() if any(map(has, names)))]


def legend(headers: list[str], notes: list[str]) -> list[str]:
    """The legend of the columns `headers` (as printed, in order), and under "case" the `notes` (keys of CASES) on
    the row names: one entry `header: explanation` each, wrapped, continuation lines indented."""
    import textwrap

    lines = []
    for header in headers:
        lines += textwrap.wrap(f"{header}: {COLUMNS[header]}", LEGEND_WIDTH, subsequent_indent="    ")
        if header == "case":
            for note in notes:
                lines += textwrap.wrap(CASES[note], LEGEND_WIDTH, initial_indent="  ", subsequent_indent="    ")
    return lines


def table(results: dict) -> str:
    """The suite's rows as text, a prefill and a decode table per shape, with each row's speedup over the baselines
    it names, its accuracy, its measured time over the roofline bound, and how its solve ended (marked when not
    ok, with a note under the table); then the speculative table, and a legend of exactly the columns printed."""
    lines = [f"{results['device']} ({results['dtype']}, {results['threads']} threads, torch {results['torch']}, "
             f"median of {results['repeats']}); matmul {results['rates']['matmul_flops'] / 1e9:.0f} GFLOP/s, copy "
             f"{results['rates']['copy_bytes'] / 1e9:.1f} GB/s"]
    any_failed = False
    printed, notes = [], []  # the headers and the notes on the row names, each once, in the order printed
    for shape in results["shapes"]:
        s = shape["shape"]
        for kind, unit, accuracy in (("prefill", "ms", "top-1 agr"), ("decode", "ms/tok", "tok agr")):
            rows = shape[kind]
            columns = [("case", "<34"), (unit, ">8"), ("spread", ">15"), ("x fastest", ">10"), (accuracy, ">9"),
                       ("max|dlogit|", ">11"), ("roofline", ">8"), ("solve", "")]
            lines += ["", f"{kind}: L{s['layers']} D{s['width']} T{s['tokens']}, random trained-like weights (x "
                      f"fastest over: {baselines(rows)})", _heading(columns, printed)]
            notes += [note for note in _row_notes(kind, rows) if note not in notes]
            for r in rows:
                quality = r.get("top1_agreement", r.get("token_agreement"))
                diff = r.get("max_abs_logit_diff")
                lines.append(
                    f"{r['case']:<34} {r['median_s'] * 1e3:>8.2f} {r['min_s'] * 1e3:>7.2f}-{r['max_s'] * 1e3:<7.2f} "
                    f"{r['speedup']:>9.2f}x"
                    f" {'' if quality is None else f'{quality:.3f}':>9} {'' if diff is None else f'{diff:.1e}':>11}"
                    f" {r['bound_s'] / r['median_s'] if 'bound_s' in r else float('nan'):>7.0%}  {_outcome(r)}")
                any_failed |= failed(r)
        if shape.get("speculative"):
            lines += ["", f"speculative decoding: L{s['layers']} D{s['width']}, batch 1, random trained-like weights "
                          f"(x fastest over: {baselines(shape['speculative'])})",
                      *speculative_table(shape["speculative"])]
            _heading(SPECULATIVE_COLUMNS, printed)
            notes += ["speculative"] if "speculative" not in notes else []
    lines += ["", *legend(printed, notes)]
    if any_failed:
        lines.append(FAILED_NOTE)
    if results.get("trained"):
        lines += trained_table(results["trained"])
    return "\n".join(lines)


def trained_table(trained: dict) -> list[str]:
    """The models trained for SNLP (suite.trained_rows): per model, the grid of `snlp eval` with each plan's
    held-out PPL and top-1 agreement beside its speedup over the fastest sequential forward."""
    from ..training.evaluate import grid_table

    lines = []
    for label, m in trained["models"].items():
        lines += ["", f"trained for SNLP: `snlp demo --{trained['preset']}`'s {label} model (run "
                      f"{Path(m['run']).name} of the cache), held-out text:", grid_table(m["grid"], m["speed"])]
    return lines


SPECULATIVE_COLUMNS = [("case", "<40"), ("ms/tok", ">8"), ("spread", ">15"), ("tok/s", ">8"), ("accept", ">7"),
                       ("tok/rnd", ">7"), ("x fastest", ">10"), ("= greedy", "")]


def baselines(rows: list[dict]) -> str:
    """The baseline cases of the rows' speedups, each once (the mHC rows, and each temperature, have their own)."""
    return ", ".join(dict.fromkeys(r["baseline"] for r in rows))


def speculative_table(rows: list[dict]) -> list[str]:
    """Lines of speculative rows (speculation.speculative_rows): time per token, tokens/s, acceptance, tokens per
    round, speedup over the fastest sequential decoding at the same temperature, and at temperature 0 whether the
    tokens are eager sequential greedy decoding's (the columns of SPECULATIVE_COLUMNS, explained in COLUMNS)."""
    lines = [_heading(SPECULATIVE_COLUMNS, [])]
    for r in rows:
        accept, length, equal = r["acceptance_rate"], r["mean_accepted_length"], r["greedy_equal"]
        lines.append(f"{r['case']:<40} {r['median_s'] * 1e3:>8.2f} {r['min_s'] * 1e3:>7.2f}-{r['max_s'] * 1e3:<7.2f} "
                     f"{r['tokens_per_s']:>8.1f} {'' if accept is None else f'{accept:.3f}':>7} "
                     f"{'' if length is None else f'{length:.2f}':>7} {r['speedup']:>9.2f}x  "
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
