"""Benchmark rows of self-speculative decoding (not tests): per-token time, acceptance and speedup over sequential
decoding, sweeping the draft length B, the temperature and the drafting plan, all on one model and one prompt.

Kept apart from suite.py, which calls it, because it is also what `benchmarks/speculative.py` times on trained
models (random weights say little about acceptance: their next-token distributions are nearly uniform or nearly
one-hot, not a language model's).

Each timed run generates `new_tokens` tokens after the prompt; repeat r uses seed `seed + r`, so that at
temperature > 0 the acceptance statistics pool several samples instead of repeating one, and sequential decoding
is timed on the same seeds. Repeats are interleaved over the cases of a temperature (as in bench.prefill_rows).
Speedup: over the fastest sequential decoding at the same temperature: the eager row's median time, or with
`graphed` the graphed row's where it is faster (compiled blocks and static caches, as suite.decode_rows times it),
over the row's.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Mapping

import torch

from ..inference import snlp, speculative
from ..inference.decode import Decoder, generate
from ..nanochat import GPT
from .bench import SEQUENTIAL, compiled_blocks, timer

GRAPHED = f"{SEQUENTIAL} graphed"


@dataclass(frozen=True)
class Speculation:
    """A preset's speculative sweep: the draft lengths and temperatures, run on the preset's first shape only
    (decoding after the suite's short prompt does not depend on the shape's prefill length, and on the cpu preset
    the larger shape would double the suite's time)."""

    draft_lens: tuple[int, ...] = (1, 2, 4, 8)
    temperatures: tuple[float, ...] = (0.0, 1.0)


@dataclass(frozen=True)
class Comparison:
    """One speculative decoding and one sequential decoding of the same prompt: the tokens of each, the rounds'
    statistics, and the wall time of each (seconds)."""

    tokens: torch.Tensor
    stats: speculative.SpeculationStats
    seconds: float
    sequential_tokens: torch.Tensor
    sequential_seconds: float

    @property
    def speedup(self) -> float:
        return self.sequential_seconds / self.seconds


def compare(model: GPT, prompt: torch.Tensor, max_new: int, plan: snlp.Plan, draft_len: int = 4,
            temperature: float = 0.0, top_k: int | None = None, seed: int = 0) -> Comparison:
    """Speculative decoding (`plan` drafts) and sequential decoding of `prompt`, same arguments, each timed once
    after a one-token warm-up (so that neither pays the model's first-call preparation): what `snlp generate
    --speculative` prints."""
    timed = timer(prompt.device)
    runs = {"speculative": lambda n: speculative.generate(model, prompt, n, plan, draft_len, temperature, top_k,
                                                          seed),
            "sequential": lambda n: (generate(model, prompt, n, None, temperature, top_k, seed), None)}
    outputs, seconds = {}, {}
    with torch.inference_mode():
        for name, run in runs.items():
            run(1)
            seconds[name] = timed(lambda: outputs.setdefault(name, run(max_new)))
    (tokens, stats), (sequential, _) = outputs["speculative"], outputs["sequential"]
    return Comparison(tokens, stats, seconds["speculative"], sequential, seconds["sequential"])


def speculative_plans(layers: int) -> list[snlp.Plan]:
    """The drafting plans of the suite: IDN over the last half with K = 1, from repeat and warm (the two cheapest
    drafts; the verifier then saves half of a sequential pass's block work)."""
    half = max(1, layers // 2)
    return [snlp.Plan(n_par=half, iters=1), snlp.Plan(n_par=half, iters=1, init="warm")]


def speculative_rows(model: GPT, prompt: torch.Tensor, new_tokens: int, plans: Mapping[str, snlp.Plan],
                     draft_lens=(1, 2, 4, 8), temperatures=(0.0, 1.0), top_k: int | None = None, warmup: int = 1,
                     repeats: int = 5, seed: int = 0, progress=print, graphed: bool = False) -> list[dict]:
    """Rows per temperature: sequential decoding first (plan "sequential", draft_len None; with `graphed` also
    "sequential graphed", on a copy of the model with compiled blocks and static caches, compiled before the
    first temperature, its compile_s apart), then every plan at every draft length. Each row: case, plan (its
    name), draft_len, temperature, median / min / max seconds per token, tokens_per_s, acceptance_rate and
    mean_accepted_length (pooled over the repeats; None for sequential), speedup over the fastest sequential row of
    its temperature and that row's case as baseline, and greedy_equal: at temperature 0, whether the tokens equal
    eager sequential greedy decoding's (None when sampling, where only the distribution is the same)."""
    if SEQUENTIAL in plans or GRAPHED in plans:
        raise ValueError(f"plans: the names {SEQUENTIAL!r} and {GRAPHED!r} are sequential decoding's rows; name the "
                         "plan otherwise")
    timed = timer(prompt.device)
    ways = {SEQUENTIAL: (model, False)}  # sequential decoding's rows: name -> (model, static caches)
    compile_s = None
    if graphed:
        ways[GRAPHED] = (compiled_blocks(model, prompt.device), True)
    capacity = prompt.shape[1] + new_tokens

    def run(name, plan, B, temperature, r):
        if plan is None:
            runner, static = ways[name]
            return Decoder(runner, None, capacity, static).generate(prompt, new_tokens, temperature, top_k,
                                                                    seed + r), None
        return speculative.generate(model, prompt, new_tokens, plan, B, temperature, top_k, seed + r)

    rows = []
    with torch.inference_mode():
        if graphed:  # the first decoding compiles the prompt's and a step's shapes
            compile_s = timed(lambda: run(GRAPHED, None, None, 0.0, 0))
        for temperature in temperatures:
            cases = [(name, None, None) for name in ways] + [(name, plan, B) for name, plan in plans.items()
                                                             for B in draft_lens]
            times, outputs = ([[] for _ in cases] for _ in range(2))
            for case in cases:
                for r in range(warmup):
                    run(*case, temperature, r)
            for r in range(repeats):  # interleaved: a drift in the machine's speed falls on every case alike
                for i, case in enumerate(cases):
                    times[i].append(timed(lambda: outputs[i].append(run(*case, temperature, r))) / new_tokens)
            group = [_row(name, plan, B, temperature, times[i], outputs[i]) for i, (name, plan, B) in enumerate(cases)]
            base, expected = min(group[:len(ways)], key=lambda row: row["median_s"]), group[0]["tokens"]
            for row in group:
                row["speedup"], row["baseline"] = base["median_s"] / row["median_s"], base["case"]
                tokens = row.pop("tokens")
                row["greedy_equal"] = all(map(torch.equal, tokens, expected)) if temperature == 0 else None
                if row["plan"] == GRAPHED:
                    row["compile_s"] = compile_s
                progress(f"  {row['case']}: {row['median_s'] * 1e3:.2f} ms/token, x{row['speedup']:.2f}")
            rows += group
    return rows


def _row(name, plan, B, temperature, times, outputs) -> dict:
    stats = [s for _, s in outputs if s is not None]
    drafted, rounds = sum(s.drafted for s in stats), sum(s.rounds for s in stats)
    median = statistics.median(times)
    return {"case": f"speculative T{temperature:g} {name}" + ("" if B is None else f" B{B}"),
            "plan": name, "draft_len": B, "temperature": temperature, "median_s": median, "min_s": min(times),
            "max_s": max(times), "tokens_per_s": 1 / median,
            "acceptance_rate": sum(s.accepted for s in stats) / drafted if drafted else None,
            "mean_accepted_length": sum(s.tokens for s in stats) / rounds if rounds else None,
            "tokens": [out for out, _ in outputs]}
