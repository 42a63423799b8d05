"""Benchmark rows of self-speculative decoding (not tests): per-token time, acceptance and speedup over sequential
decoding, sweeping the draft length B, the temperature and the drafting plan, all on one model and one prompt.

Kept apart from suite.py, which calls it, because it is also what `benchmarks/speculative.py` times on trained
models (random weights say little about acceptance: their next-token distributions are nearly uniform or nearly
one-hot, not a language model's).

Each timed run generates `new_tokens` tokens after the prompt; repeat r uses seed `seed + r`, so that at
temperature > 0 the acceptance statistics pool several samples instead of repeating one, and sequential decoding
is timed on the same seeds. Repeats are interleaved over the cases of a temperature (as in bench.prefill_rows).
Speedup: the sequential row's median time over the row's, at the same temperature.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Mapping

import torch

from ..inference import snlp, speculative
from ..inference.decode import generate
from ..nanochat import GPT
from .bench import SEQUENTIAL, timer


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
                     repeats: int = 5, seed: int = 0, progress=print) -> list[dict]:
    """Rows per temperature: sequential decoding first (plan "sequential", draft_len None), then every plan at
    every draft length. Each row: case, plan (its name), draft_len, temperature, median / min / max seconds per
    token, tokens_per_s, acceptance_rate and mean_accepted_length (pooled over the repeats; None for sequential),
    speedup over the sequential row, and greedy_equal: at temperature 0, whether the tokens equal sequential greedy
    decoding's (None when sampling, where only the distribution is the same)."""
    if SEQUENTIAL in plans:
        raise ValueError(f"plans: the name {SEQUENTIAL!r} is sequential decoding's row; name the plan otherwise")
    timed = timer(prompt.device)
    rows = []
    for temperature in temperatures:
        cases = [(SEQUENTIAL, None, None)] + [(name, plan, B) for name, plan in plans.items() for B in draft_lens]

        def run(plan, B, r):
            if plan is None:
                return generate(model, prompt, new_tokens, None, temperature, top_k, seed + r), None
            return speculative.generate(model, prompt, new_tokens, plan, B, temperature, top_k, seed + r)

        times, outputs = ([[] for _ in cases] for _ in range(2))
        with torch.inference_mode():
            for case in cases:
                for r in range(warmup):
                    run(case[1], case[2], r)
            for r in range(repeats):  # interleaved: a drift in the machine's speed falls on every case alike
                for i, (_, plan, B) in enumerate(cases):
                    times[i].append(timed(lambda: outputs[i].append(run(plan, B, r))) / new_tokens)
        group = [_row(name, plan, B, temperature, times[i], outputs[i]) for i, (name, plan, B) in enumerate(cases)]
        base, expected = group[0]["median_s"], group[0]["tokens"]
        for row in group:
            row["speedup"] = base / row["median_s"]
            tokens = row.pop("tokens")
            row["greedy_equal"] = all(map(torch.equal, tokens, expected)) if temperature == 0 else None
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
