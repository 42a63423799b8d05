"""`snlp plan MODEL`: find the segment of layers to solve in parallel, before any training.

On calibration text (the validation split of the corpus) it measures the model's per-layer update profile,
||h_l - h_{l-1}|| / ||h_{l-1}||, then probes plans over candidate segments: for each segment length n, the tail and
the `per_length` windows whose layers change the state least, each at every strategy and K. A plan's row has its
perplexity gap to the sequential model, its top-1 agreement with the sequential logits, and its measured speedup
(`bench.speedups`, batch 1). The table is ranked: plans within the PPL budget first, longest segment and fewest
iterations first (the most sequential depth saved), then the rest by their gap. The recommendation is the first
row within the budget.

Why the profile picks the windows: after K >= 1 iterations the segment's first layer is exact (its input h_s is),
and the error grows with how far the layers after it move the state, so a window is scored by the summed update of
its layers but the first. The score only proposes candidates; the table's figures are measured.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

import layersolve as ls

from ..inference import snlp
from ..io import save_figure, write_atomic, write_json
from ..training import evaluate
from . import bench
from .flags import COUNT, POSITIVE, baseline_flag
from .names import LABELS, STRATEGIES, plan_name, strategy

CONTEXT = 128  # tokens per calibration sequence by default
BATCH = 8  # sequences per batch by default
TOKENS = 1024  # calibration tokens by default: 8 x 128


@dataclass(frozen=True)
class Search:
    """What `search` probes: segment lengths, the easiest windows per length beside the tail, the strategies and
    the iteration counts."""

    lengths: tuple[int, ...]
    strategies: Mapping[str, ls.Jacobian]
    iters: tuple[int, ...] = (1, 2)
    per_length: int = 2

    def check(self, n_layer: int) -> None:
        bad = [n for n in self.lengths if not 1 <= n <= n_layer]
        if not self.lengths or bad:
            raise ValueError(f"lengths must be segment lengths in [1, {n_layer}] (the model's layers), got "
                             f"{list(self.lengths)}")
        if not self.strategies or not self.iters or min(self.iters) < 1 or self.per_length < 0:
            raise ValueError("a search needs strategies, iteration counts >= 1 and per_length >= 0")


def default_lengths(n_layer: int) -> tuple[int, ...]:
    """L/8, L/4, 3L/8 and L/2, at least 2 (a segment of one layer is exact at K = 1), without repeats."""
    return tuple(sorted({max(2, n_layer * q // 8) for q in (1, 2, 3, 4)} & set(range(2, n_layer + 1))))


@torch.no_grad()
def update_profile(model, batches) -> list[float]:
    """The relative update ||h_{i+1} - h_i|| / ||h_i|| of each block i = 0 .. L - 1 (norms over a whole batch),
    averaged over the token batches (B, T)."""
    total, count = None, 0
    for idx in batches:
        trace = model.trace(model.embed(idx))  # h_0 .. h_L
        if model.config.use_mhc:  # (B, S, T, D): the streams' sum is the state the head reads
            trace = [h.sum(dim=1) for h in trace]
        update = torch.stack([(b - a).float().norm() / a.float().norm() for a, b in zip(trace, trace[1:])])
        total, count = update if total is None else total + update, count + 1
    if count == 0:
        raise ValueError("the calibration text gave no batch: give more --max-tokens or a longer --corpus")
    return (total / count).tolist()


def candidate_segments(profile: list[float], lengths, per_length: int) -> list[range]:
    """For each length n: the tail, and the `per_length` windows of blocks [s, s + n) other than the tail of
    least summed update over their blocks but the first (profile[i] is block i's update)."""
    L, out = len(profile), []
    for n in lengths:
        score = {s: sum(profile[s + 1:s + n]) for s in range(L - n)}  # every start but the tail's, L - n
        easiest = sorted(score, key=lambda s: (score[s], s))[:per_length]
        out += [range(s, s + n) for s in sorted([*easiest, L - n])]
    return out


def plans(segments: list[range], search: Search, n_layer: int) -> dict[str, snlp.Plan]:
    """Every (segment, strategy, K) plan, by name; the tail keeps its default spelling."""
    out = {}
    for segment in segments:
        start = None if segment.stop == n_layer else segment.start
        for jacobian in search.strategies.values():
            for k in search.iters:
                plan = snlp.Plan(n_par=len(segment), jacobian=jacobian, iters=k, start=start)
                out[plan_name(plan)] = plan
    return out


def rows(grid: Mapping[str, dict], speed: dict, named: Mapping[str, snlp.Plan], profile: list[float],
         n_layer: int) -> list[dict]:
    """One row per plan: its segment, strategy, K, PPL and the gap to the sequential PPL, top-1 agreement, speedup,
    how its solve ended, and the mean update of the segment's layers."""
    base = grid["sequential"]["quality"]["ppl"]
    out = []
    for name, plan in named.items():
        cell, segment = grid[name], plan.segment(n_layer)
        ppl = cell["quality"]["ppl"]
        out.append({"plan": name, "start": segment.start, "stop": segment.stop, "n_par": plan.n_par,
                    "strategy": LABELS.get(type(plan.jacobian), type(plan.jacobian).__name__), "iters": plan.iters,
                    "ppl": ppl, "ppl_gap": ppl / base - 1 if math.isfinite(ppl) else math.inf,
                    "top1_agreement": cell["top1_agreement"], "speedup": speed["rows"][name]["speedup"],
                    "result": cell["result"], "tail": segment.stop == n_layer,
                    "mean_update": sum(profile[segment.start:segment.stop]) / plan.n_par})
    return out


def within(row: dict, budget: float) -> bool:
    return ls.Result[row["result"]].ok and row["ppl_gap"] <= budget


def ranked(table_rows: list[dict], budget: float) -> list[dict]:
    """Within the budget first, the longest segment and the fewest iterations first (then the smallest gap); then
    the rest by gap."""
    inside = sorted((r for r in table_rows if within(r, budget)), key=lambda r: (-r["n_par"], r["iters"],
                                                                                 r["ppl_gap"]))
    outside = sorted((r for r in table_rows if not within(r, budget)), key=lambda r: r["ppl_gap"])
    return inside + outside


def search(model, val: evaluate.Validation, plan_search: Search, budget: float, repeats: int = 5,
           progress: Callable[[str], None] = print, compile: bool = True) -> dict:
    """The profile, the candidates' rows ranked, and the recommendation (None when no plan is within budget)."""
    L = model.config.n_layer
    plan_search.check(L)
    batches = [x for x, _ in val.batches(model.lm_head.weight.device)]
    profile = update_profile(model, batches)
    progress("per-layer relative update: " + " ".join(f"{u:.3g}" for u in profile))
    named = plans(candidate_segments(profile, plan_search.lengths, plan_search.per_length), plan_search, L)
    grid = evaluate.grid(model, val, named, progress)
    speed = bench.speedups(model, batches[0][:1], named, repeats=repeats, progress=progress, compile=compile)
    table_rows = ranked(rows(grid, speed, named, profile, L), budget)
    best = next((r for r in table_rows if within(r, budget)), None)
    return {"budget": budget, "sequential": grid["sequential"]["quality"], "profile": profile,
            "speed_baseline": speed["baseline"], "repeats": repeats, "rows": table_rows, "recommendation": best}


def segment_text(row: dict) -> str:
    return f"{row['start']}-{row['stop'] - 1}" + (" (tail)" if row["tail"] else "")


def table(results: dict) -> str:
    """The ranked rows as text, the recommendation under them."""
    budget = results["budget"]
    lines = [f"sequential {evaluate.describe(results['sequential'])}; budget {budget:.1%} PPL gap",
             f"{'':2}{'layers':<13} {'n':>3} {'strategy':<8} {'K':>2} {'ppl':>10} {'ppl gap':>9} {'top-1':>6} "
             f"{'speedup':>8} {'update':>7}  solve"]
    for r in results["rows"]:
        gap = f"{r['ppl_gap']:+.1%}" if abs(r["ppl_gap"]) < 100 else f"{r['ppl_gap']:+.2g}"
        ppl = f"{r['ppl']:.3f}" if r["ppl"] < 1e5 else f"{r['ppl']:.3g}"
        lines.append(f"{'*' if within(r, budget) else ' ':2}{segment_text(r):<13} {r['n_par']:>3} {r['strategy']:<8} "
                     f"{r['iters']:>2} {ppl:>10} {gap:>9} {r['top1_agreement']:>6.3f} {r['speedup']:>7.2f}x "
                     f"{r['mean_update']:>7.3f}  {r['result']}")
    best = results["recommendation"]
    lines.append("")
    if best is None:
        closest = results["rows"][0] if results["rows"] else None
        lines.append(f"no plan is within the {budget:.1%} budget"
                     + ("" if closest is None else f"; the closest is layers {segment_text(closest)}, "
                        f"{closest['strategy']} K{closest['iters']}, at {closest['ppl_gap']:+.1%}"))
    else:
        lines.append(f"recommended: layers {segment_text(best)} (n {best['n_par']}), {best['strategy']} "
                     f"K{best['iters']}: PPL gap {best['ppl_gap']:+.1%}, top-1 {best['top1_agreement']:.3f}, "
                     f"{best['speedup']:.2f}x")
        flags = f"--n-par {best['n_par']}" + ("" if best["tail"] else f" --start {best['start']}")
        lines.append(f"  use it: snlp eval ... {flags} --iters {best['iters']} --strategies "
                     f"{_strategy_flag(best['strategy'])}")
    lines.append(f"*: within the budget. ppl gap: the plan's PPL over the sequential PPL, minus 1. top-1: agreement "
                 f"of its logits' argmax with the sequential logits'. speedup: the median time of the "
                 f"{results['speed_baseline']} over the plan's, {results['repeats']} interleaved repeats. update: "
                 f"the mean relative update ||h_l - h_(l-1)|| / ||h_(l-1)|| of the segment's layers. layers: "
                 f"0-based blocks, solved in parallel; the others run in order.")
    return "\n".join(lines)


def _strategy_flag(label: str) -> str:
    return next(name for name, jacobian in STRATEGIES.items() if LABELS[type(jacobian)] == label)


# -- the command line ------------------------------------------------------------------------------------------------

def budget(text: str) -> float:
    """An argparse type: a PPL budget, "3%" or the fraction 0.03; positive and finite."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a percentage such as 3% (or the fraction 0.03), got {text!r}") \
            from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a percentage >= 0 such as 3%, got {text!r}")
    return value


def add_parser(sub) -> None:
    """`snlp plan`'s flags."""
    p = sub.add_parser("plan", help="find the segment of layers to solve in parallel: the update profile, then PPL "
                                    "gap, top-1 and speedup of candidate segments, ranked, with a recommendation")
    p.add_argument("checkpoint", type=Path, nargs="?", help="a run directory (model_*.pt, meta_*.json, tokenizer/)")
    p.add_argument("--hf", type=Path, metavar="DIR", help="instead: a local Hugging Face model directory")
    p.add_argument("--step", type=COUNT)
    p.add_argument("--corpus", help="calibration text: its validation split (default: the embedded plays')")
    p.add_argument("--context", type=POSITIVE, help=f"tokens per sequence (default {CONTEXT}, at most the model's)")
    p.add_argument("--batch-size", type=POSITIVE, default=BATCH)
    p.add_argument("--max-tokens", type=POSITIVE, default=TOKENS, help=f"calibration tokens (default {TOKENS})")
    p.add_argument("--budget", type=budget, default=0.03, help="the PPL gap a plan may cost, e.g. 3%% (default)")
    p.add_argument("--lengths", type=POSITIVE, nargs="+", help="segment lengths (default L/8, L/4, 3L/8, L/2)")
    p.add_argument("--per-length", type=COUNT, default=2, help="the easiest windows per length, beside the tail")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=["idn"])
    p.add_argument("--iters", type=POSITIVE, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=POSITIVE, default=5, help="timed calls per plan for the speedup column")
    baseline_flag(p)
    p.add_argument("--out", type=Path, help="JSON path (default: <model>/plan.json); the table (.md) and the profile "
                                            "figure (.png) go beside it")


def search_of(args, n_layer: int) -> Search:
    """The flags' Search (strings to strategies here, at the edge)."""
    return Search(tuple(args.lengths or default_lengths(n_layer)), {s: strategy(s) for s in args.strategies},
                  tuple(args.iters), args.per_length)


def run(args, model, source: Path, val: evaluate.Validation) -> int:
    """`snlp plan`: search, print the table, write the JSON, the table (.md) and the profile figure (.png)."""
    import analysis

    out = args.out or source / "plan.json"
    results = search(model, val, search_of(args, model.config.n_layer), args.budget, args.repeats,
                     compile=not args.eager_baseline)
    results = {"model": str(source), "environment": bench.environment(model.lm_head.weight.device),
               "context": val.seq_len,
               "tokens": args.max_tokens, **results}
    text = table(results)
    write_json(out, results)
    write_atomic(out.with_suffix(".md"), lambda f: f.write(f"# snlp plan {source}\n\n```\n{text}\n```\n".encode()))
    best = results["recommendation"]
    figure = analysis.plot_update_profile(results["profile"], None if best is None else (best["start"], best["stop"]),
                                          f"{source.name}: per-layer update on the calibration text")
    save_figure(figure, out.with_suffix(".png"))
    print(text)
    print(f"wrote {out}, {out.with_suffix('.md').name} and {out.with_suffix('.png').name}")
    return 0
