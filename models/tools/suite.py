"""The benchmark suite of `snlp bench --preset`: prefill and decoding, sequential against SNLP plans, on the shapes
of a preset, with eager and compiled sequential baselines and a roofline (not a test).

Per shape, a model with trained-like random weights (nanochat GPT without the x0 / resid blend and value
embeddings, full windows) and, for the HCN row, its mHC twin of the same size. Rows:

    prefill  sequential (eager; compiled: torch.compile, with CUDA graphs on GPU), IDN at n = L/2 and n = L with
             K = 1, 2, (n/2)xF2 K1 and 1xF(n) K1 at n = L/2, HCN (Mixing) K1 at n = L/2 on the mHC model; and
             with compiled blocks (GPT.compile_blocks, CUDA graphs on GPU): sequential, IDN n = L/2 K1 and
             (n/2)xF2 K1, each with its compile time apart;
    decode   per generated token after an 8-token prompt, at each decode batch: sequential, IDN n = L/2 with K = 1
             and 2 from repeat, and K = 1 warm (the previous token's trace); on the GPU preset the same again
             graphed (compiled blocks, static caches, CUDA graphs), each with its compile time apart, on the CPU
             preset the sequential row alone (the other sequential way);
    speculative  on the first shape, self-speculative decoding at batch 1 (speculation.py): IDN n = L/2 K1 from
             repeat and warm drafting, at each draft length and temperature, against sequential decoding.

Each row has the median and spread over repeats, its speedup over the fastest sequential way of its table (the
baseline it names), the solve's result, its accuracy against the eager sequential path (prefill: top-1 agreement
and max |logit difference|; decode: the fraction of generated tokens equal to sequential decoding's), the peak
memory on GPU, and a roofline: the row's matmul FLOPs over the matmul rate and its bytes over the copy bandwidth,
both measured in the same run.

Byte model (stated, rough): each block evaluation reads the block's weights once and passes over its
(tokens x width) state 16 times (norms, projections' inputs and outputs, residual adds, the correction).
"""

from __future__ import annotations

import functools
import statistics
from dataclasses import asdict, dataclass

import torch

import layersolve as ls

from ..inference import snlp
from ..inference.decode import Decoder
from ..nanochat import GPT, GPTConfig
from .bench import (COMPILED, SEQUENTIAL, compile_mode, compiled_blocks, environment, fastest, interleaved,
                    prefill_rows, speedups, timer)
from .names import plan_name
from .speculation import Speculation, speculative_plans, speculative_rows

STATE_PASSES = 16  # the byte model's passes over the state per block evaluation
PROMPT = 8  # decode rows: tokens of the prompt before the timed generation


@dataclass(frozen=True)
class Shape:
    layers: int
    width: int
    tokens: int


@dataclass(frozen=True)
class Preset:
    shapes: tuple[Shape, ...]
    dtype: torch.dtype
    head_dim: int
    decode_batches: tuple[int, ...] = (1,)
    new_tokens: int = 64
    repeats: int = 7
    warmup: int = 2
    compile: bool = True
    # decode rows again with compiled blocks and static caches (CUDA graphs on GPU): "all" of them, "sequential"
    # only (a baseline: the faster of eager and compiled decoding), or "" none
    graphed_decode: str = ""
    vocab_size: int = 8192
    speculation: Speculation | None = Speculation()
    # a training preset whose demo pair (baseline and IDN-regularized, `snlp demo --<name>`'s runs, trained or reused
    # from the cache) is timed beside its held-out PPL and top-1: the rows of models trained for SNLP
    trained: str | None = None


PRESETS = {
    # speculation at B = 2 and 8 only: the whole sweep (B = 1, 2, 4, 8) alone took over 400 s on a busy 2-core CPU
    "cpu": Preset((Shape(12, 128, 256), Shape(24, 256, 512)), torch.float32, head_dim=64, repeats=5,
                  graphed_decode="sequential", speculation=Speculation(draft_lens=(2, 8)), trained="quick"),
    # bf16 weights and activations (no autocast): the dtype the paper's GPU timings use.
    "gpu-0.5b": Preset((Shape(32, 640, 512), Shape(32, 640, 2048)), torch.bfloat16, head_dim=128,
                       decode_batches=(1, 8), repeats=10, warmup=3, graphed_decode="all"),
    "tiny": Preset((Shape(4, 64, 32),), torch.float32, head_dim=64, new_tokens=4, repeats=1, warmup=0,
                   compile=False, vocab_size=512, speculation=Speculation(draft_lens=(1, 2))),
}


def model_config(shape: Shape, preset: Preset, mhc: bool = False) -> GPTConfig:
    heads = shape.width // preset.head_dim
    return GPTConfig(sequence_len=shape.tokens + PROMPT + preset.new_tokens, vocab_size=preset.vocab_size,
                     n_layer=shape.layers, n_head=heads, n_kv_head=heads, n_embd=shape.width, window_pattern="L",
                     no_x0_resid=True, no_ve=True, use_mhc=mhc, mhc_num_streams=4)


def prefill_plans(layers: int) -> list[snlp.Plan]:
    half = layers // 2
    plans = [snlp.Plan(n_par=n, iters=k) for n in (half, layers) for k in (1, 2)]
    plans += [snlp.Plan(n_par=half, fuse=f, iters=1) for f in sorted({2, half}) if f > 1 and half % f == 0]
    return plans


def compiled_plans(layers: int) -> list[snlp.Plan]:
    """The plans also timed with compiled blocks: IDN K1 and (n/2)xF2 K1 at n = L/2."""
    return [p for p in prefill_plans(layers) if p.n_par == layers // 2 and p.iters == 1 and p.fuse <= 2]


def decode_plans(layers: int) -> list[snlp.Plan]:
    half = layers // 2
    return [snlp.Plan(n_par=half, iters=1), snlp.Plan(n_par=half, iters=2), snlp.Plan(n_par=half, iters=1, init="warm")]


# -- the roofline ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rates:
    matmul_flops: float  # FLOP/s of a large square matmul in the model dtype
    copy_bytes: float  # bytes/s of a large copy (read + write)


def measure_rates(device: torch.device, dtype: torch.dtype) -> Rates:
    timed = timer(device)
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    matmul = statistics.median(timed(lambda: a @ b) for _ in range(5))
    x = torch.empty(2**26 if device.type == "cuda" else 2**24, device=device, dtype=torch.float32)
    y = torch.empty_like(x)
    copy = statistics.median(timed(lambda: y.copy_(x)) for _ in range(5))
    return Rates(2 * n**3 / matmul, 2 * x.numel() * x.element_size() / copy)


def block_flops(cfg: GPTConfig, tokens: int, context: float) -> float:
    """Matmul FLOPs of one block over `tokens` tokens (all batches) whose queries see `context` keys on average."""
    D, hd = cfg.n_embd, cfg.head_dim
    projections = 2 * tokens * D * (cfg.n_head + 2 * cfg.n_kv_head) * hd + 2 * tokens * cfg.n_head * hd * D
    mlp = 2 * 2 * tokens * D * 4 * D
    attention = 2 * 2 * tokens * cfg.n_head * hd * context
    return projections + mlp + attention


def block_bytes(cfg: GPTConfig, tokens: int, element: int) -> float:
    D, hd = cfg.n_embd, cfg.head_dim
    weights = (D * (cfg.n_head + 2 * cfg.n_kv_head) * hd + cfg.n_head * hd * D + 8 * D * D) * element
    return weights + STATE_PASSES * tokens * D * element


def evaluations(cfg: GPTConfig, plan: snlp.Plan | None) -> int:
    """Block evaluations of one forward: L sequentially; with a plan the prefix, then K passes over the n_par
    tail blocks (one more for the one-step guess)."""
    if plan is None:
        return cfg.n_layer
    return cfg.n_layer - plan.n_par + plan.n_par * (plan.iters + (plan.init == "one_step"))


def roofline(cfg: GPTConfig, plan: snlp.Plan | None, tokens: int, context: float, element: int,
             rates: Rates) -> dict:
    """The row's work and its time bound: max(FLOPs / matmul rate, bytes / copy bandwidth)."""
    n = evaluations(cfg, plan)
    flops = n * block_flops(cfg, tokens, context) + 2 * tokens * cfg.n_embd * cfg.padded_vocab_size
    nbytes = n * block_bytes(cfg, tokens, element)
    return {"flops": flops, "bytes": nbytes,
            "bound_s": max(flops / rates.matmul_flops, nbytes / rates.copy_bytes)}


# -- decoding ----------------------------------------------------------------------------------------------------------

def decode_rows(model: GPT, batch: int, new_tokens: int, plans: dict[str, snlp.Plan], warmup: int, repeats: int,
                rates: Rates, progress=print, graphed: str = "") -> list[dict]:
    """Per-token time of greedy decoding after a prompt, sequential (the first row) and with each plan; the
    accuracy column compares each row's tokens with the first row's. graphed ("all", "sequential" or ""): those
    rows again on a copy of the model with compiled blocks (CUDA graphs on GPU) and static caches, each with its
    compile time apart (the first decoding, which compiles the prompt's and a step's shapes). Repeats are interleaved
    over the rows, as prefill's are. Every speedup is over the faster of eager and graphed sequential decoding."""
    device = model.lm_head.weight.device
    prompt = decode_prompt(model, batch)
    timed = timer(device)
    variants = [(model, False, "")]
    if graphed:
        variants.append((compiled_blocks(model, device), True, " graphed"))
    cases = [(f"decode b{batch} {name}{suffix}", runner, plan, static) for runner, static, suffix in variants
             for name, plan in {SEQUENTIAL: None, **(plans if not static or graphed == "all" else {})}.items()]

    def run(runner, plan, static):
        decoder = Decoder(runner, plan, capacity=PROMPT + new_tokens, static=static)
        return decoder.generate(prompt, new_tokens), decoder.results

    with torch.inference_mode():
        # a graphed case's first call compiles its shapes: timed apart
        compile_s = {case: timed(lambda: run(runner, plan, static)) for case, runner, plan, static in cases if static}
        calls = {case: functools.partial(run, *rest) for case, *rest in cases}
        times = {case: [t / new_tokens for t in ts] for case, ts in interleaved(calls, timed, warmup, repeats).items()}
        outputs = {}
        for case, *rest in cases:  # the tokens, and on a GPU the case's own peak memory
            _memory(device)
            outputs[case] = (*run(*rest), _memory(device))
    rows, reference = [], None
    for case, _, plan, _ in cases:
        tokens, results, memory = outputs[case]
        reference = tokens if reference is None else reference
        row = {"case": case, "median_s": statistics.median(times[case]), "min_s": min(times[case]),
               "max_s": max(times[case]), "token_agreement": float((tokens == reference).float().mean()), **memory,
               **roofline(model.config, plan, batch, PROMPT + new_tokens / 2, model.dtype.itemsize, rates)}
        if case in compile_s:
            row["compile_s"] = compile_s[case]
        if results:
            row["result"] = ls.Result.worst(results).name
        rows.append(row)
        progress(f"  {row['case']}: {row['median_s'] * 1e3:.2f} ms/token")
    sequential = tuple(case for case, _, plan, _ in cases if plan is None)  # eager, and graphed when timed
    return _speedups(rows, fastest(rows, sequential))


def decode_prompt(model: GPT, batch: int) -> torch.Tensor:
    """The decode rows' prompt: PROMPT random tokens per sequence, the same in every run."""
    device = model.lm_head.weight.device
    return torch.randint(0, model.config.vocab_size, (batch, PROMPT), device=device,
                         generator=torch.Generator(device=device).manual_seed(0))


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_memory_bytes": None}
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return {"peak_memory_bytes": peak}


def _speedups(rows: list[dict], baseline: dict) -> list[dict]:
    """Each row's speedup over the baseline row (the fastest sequential way), whose case each row records."""
    for row in rows:
        row["speedup"] = baseline["median_s"] / row["median_s"]
        row["baseline"] = baseline["case"]
    return rows


# -- the suite ---------------------------------------------------------------------------------------------------------

def twin_models(shape: Shape, preset: Preset, device: torch.device) -> tuple[GPT, GPT]:
    """The plain model and its mHC twin, trained-like random weights, in the preset's dtype."""
    models = []
    for mhc in (False, True):
        model = GPT(model_config(shape, preset, mhc))
        model.init_weights(seed=0, output_std=0.02)
        models.append(model.to(device=device, dtype=preset.dtype).eval())
    return models[0], models[1]


def compiled_blocks_rows(model: GPT, idx: torch.Tensor, plans: dict[str, snlp.Plan], preset: Preset,
                         progress=print) -> list[dict]:
    """The sequential forward and the plans on a copy of the model whose blocks run compiled (GPT.compile_blocks;
    CUDA graphs on GPU): each row's first call, which compiles its shapes, is timed apart as compile_s."""
    twin = compiled_blocks(model, idx.device)
    timed = timer(idx.device)
    compile_s = {}
    with torch.inference_mode():
        for name, plan in {SEQUENTIAL: None, **plans}.items():
            compile_s[name] = timed(lambda: twin(idx) if plan is None else snlp.forward(twin, idx, plan))
        rows = prefill_rows(twin, idx, plans, preset.warmup, preset.repeats, lambda line: None)
    for row in rows:
        row["compile_s"] = compile_s[row["case"]]
        row["mode"] = f"compile_blocks({compile_mode(idx.device) or 'default'})"
        row["case"] += " compiled blocks"
        progress(f"  {row['case']}: {row['median_s'] * 1e3:.1f} ms (compile {row['compile_s']:.1f} s)")
    return rows


def run_shape(shape: Shape, preset: Preset, device: torch.device, rates: Rates, progress=print,
              speculation: Speculation | None = None) -> dict:
    """The shape's prefill and decode rows, and the speculative sweep `speculation` describes (None: none)."""
    model, mhc = twin_models(shape, preset, device)
    idx = torch.randint(0, preset.vocab_size, (1, shape.tokens), device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    plans = {plan_name(p): p for p in prefill_plans(shape.layers)}
    with torch.inference_mode():
        rows = prefill_rows(model, idx, plans, preset.warmup, preset.repeats, progress, preset.compile)
        hcn = snlp.Plan(n_par=shape.layers // 2, jacobian=ls.Mixing(), iters=1)
        mhc_rows = prefill_rows(mhc, idx, {f"mHC {plan_name(hcn)}": hcn}, preset.warmup, preset.repeats, progress,
                                preset.compile)
    if preset.compile:
        rows += compiled_blocks_rows(model, idx, {plan_name(p): p for p in compiled_plans(shape.layers)}, preset,
                                     progress)
    for row in mhc_rows:
        if row["case"] in (SEQUENTIAL, COMPILED):
            row["case"] = f"mHC {row['case']}"
    # every row over the fastest sequential way of its model: eager, compiled or with compiled blocks
    _speedups(rows, fastest(rows, (SEQUENTIAL, COMPILED, f"{SEQUENTIAL} compiled blocks")))
    _speedups(mhc_rows, fastest(mhc_rows, (f"mHC {SEQUENTIAL}", f"mHC {COMPILED}")))
    context = (shape.tokens + 1) / 2
    for cfg, group in ((model.config, rows), (mhc.config, mhc_rows)):
        for row in group:
            row.update(roofline(cfg, row.pop("plan", None), shape.tokens, context, preset.dtype.itemsize, rates))
    decode = [decode_rows(model, b, preset.new_tokens, {plan_name(p): p for p in decode_plans(shape.layers)},
                          preset.warmup, preset.repeats, rates, progress, preset.graphed_decode)
              for b in preset.decode_batches]
    out = {"shape": asdict(shape), "prefill": rows + mhc_rows, "decode": [row for rows_b in decode for row in rows_b]}
    if speculation is not None:
        out["speculative"] = speculative_rows(model, decode_prompt(model, 1), preset.new_tokens,
                                              {plan_name(p): p for p in speculative_plans(shape.layers)},
                                              speculation.draft_lens, speculation.temperatures,
                                              warmup=preset.warmup, repeats=preset.repeats, progress=progress,
                                              graphed=bool(preset.graphed_decode))
    return out


def trained_rows(name: str, cfg, preset: Preset, device: torch.device, cache_dir, progress=print) -> dict:
    """The demo's two models of the TrainConfig `cfg` (training preset `name`: `snlp demo --quick`'s for the
    "quick" preset), trained or reused from cache_dir: per model, the suite's prefill plans' held-out PPL and top-1
    agreement (the grid of `snlp eval`) beside their speedup over the fastest sequential forward at batch 1
    (`bench.speedups`)."""
    from ..training import evaluate
    from ..training.runs import REG_LAMBDA
    from . import demo

    runs, _, validation = demo.trained_pair(cfg, demo.regularizer_of(cfg.model.n_layer), REG_LAMBDA, cache_dir,
                                            progress)
    plans = {plan_name(p): p for p in prefill_plans(cfg.model.n_layer)}
    out = {"preset": name, "models": {}}
    for label, run in runs.items():
        progress(f"trained: {label} ({run.directory})")
        model = run.model().to(device)
        x = next(iter(validation.batches(device)))[0]
        out["models"][label] = {"run": str(run.directory), "reused": run.reused,
                                "grid": evaluate.grid(model, validation, plans, progress),
                                "speed": speedups(model, x[:1], plans, preset.warmup, preset.repeats, progress,
                                                  preset.compile)}
    return out


def run(preset_name: str, device: torch.device, progress=print, cache_dir=None) -> dict:
    preset = PRESETS[preset_name]
    rates = measure_rates(device, preset.dtype)
    results = {**environment(device), "preset": preset_name, "dtype": str(preset.dtype), "warmup": preset.warmup,
               "repeats": preset.repeats, "new_tokens": preset.new_tokens, "prompt_tokens": PROMPT,
               "rates": asdict(rates), "byte_model": f"weights once + {STATE_PASSES} passes over the state per "
                                                     "block evaluation",
               "peak_memory": "CUDA max_memory_allocated per row; not measured on the CPU",
               "baseline": "every row's speedup is over the fastest sequential way of its table on this machine "
                           "(eager, compiled, compiled blocks; decoding: eager or graphed), named in each row",
               "shapes": []}
    for i, shape in enumerate(preset.shapes):
        progress(f"L{shape.layers} D{shape.width} T{shape.tokens}")
        results["shapes"].append(run_shape(shape, preset, device, rates, progress,
                                           preset.speculation if i == 0 else None))
    if preset.trained is not None:
        from ..training.config import PRESETS as TRAINING

        results["trained"] = trained_rows(preset.trained, TRAINING[preset.trained], preset, device, cache_dir,
                                          progress)
    return results
