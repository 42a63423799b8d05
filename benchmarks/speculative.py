"""Self-speculative decoding on the demo's two trained models (the tiny preset: 8 layers, width 128; a baseline and
the IDN-regularized one), which random weights cannot stand in for: acceptance depends on how close the draft's
next-token distributions are to a trained model's.

    SNLP_CACHE=snlp-out/cache python benchmarks/speculative.py --out benchmarks/results/cpu-speculative.json
    python benchmarks/speculative.py --runs /tmp/x/cachefull/runs      # run directories trained before

The models are `snlp demo`'s (the same configs and cache key, `cached_run`: reused when trained before by the
same code, else trained, about 10 minutes on 2 CPU cores), or with --runs the baseline-* and idn-regularized-*
run directories in a folder (a cache's runs/ from another code version: its key no longer matches). The prompt is the first PROMPT tokens of the validation plays; each row
generates NEW tokens after it, sequential decoding (eager, and graphed: compiled blocks and static caches) timed in
the same sweep on the same prompt and seeds (`speculation.speculative_rows`); every speedup is over the faster of
the two at the row's temperature. Writes the JSON, a Markdown table beside it, and the figure (.png).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import layersolve as ls  # noqa: E402
import analysis  # noqa: E402
from models import nanochat, snlp  # noqa: E402
from models.io import save_figure, write_atomic, write_json  # noqa: E402
from models.tools.bench import baselines, environment, speculative_table  # noqa: E402
from models.tools.cli import CACHE  # noqa: E402
from models.tools.names import n_par_configs, plan_name  # noqa: E402
from models.tools.speculation import speculative_rows  # noqa: E402
from models.training.config import PRESETS  # noqa: E402
from models.training.data import load_corpus  # noqa: E402
from models.training.loop import Data  # noqa: E402
from models.training.regularizer import Regularizer  # noqa: E402
from models.training.runs import cached_run  # noqa: E402
from models.training.tokenizer import Tokenizer  # noqa: E402

PROMPT, NEW = 16, 96  # 112 of the models' 128 positions
DRAFT_LENS, TEMPERATURES = (1, 2, 4, 8), (0.0, 1.0)


def demo_runs(cache: Path) -> dict[str, Path]:
    """The run directories of `snlp demo`'s models (models.tools.cli._demo's configs)."""
    cfg = PRESETS["tiny"]
    regularizer = Regularizer(ls.Identity(), n_par_configs(cfg.model.n_layer, quarters=(1, 2)), stride=1)
    data = Data.prepare(None, cfg.model.vocab_size, cache)
    configs = {"baseline": cfg,
               "idn-regularized": dataclasses.replace(cfg, regularizer=regularizer, reg_lambda=1.0)}
    return {name: cached_run(run_cfg, data, cache, name)[0] for name, run_cfg in configs.items()}


def found_runs(folder: Path) -> dict[str, Path]:
    """The newest baseline-* and idn-regularized-* run directories in `folder`."""
    runs = {}
    for name in ("baseline", "idn-regularized"):
        found = sorted(folder.glob(f"{name}-*"), key=lambda path: path.stat().st_mtime)
        if not found:
            raise SystemExit(f"--runs {folder}: no {name}-* run directory")
        runs[name] = found[-1]
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/cpu-speculative.json")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--runs", type=Path, help="a folder of baseline-* and idn-regularized-* run directories "
                                                  "(default: the demo's cached runs, trained if missing)")
    args = parser.parse_args()
    torch.manual_seed(0)
    _, validation = load_corpus(None).split()
    rows, runs = [], {}
    for name, directory in (demo_runs(CACHE) if args.runs is None else found_runs(args.runs)).items():
        model = nanochat.load(directory).eval()
        tokenizer = Tokenizer.load(directory / "tokenizer")
        ids = tokenizer.encode(validation.texts[0][:2000], prepend=tokenizer.get_bos_token_id())
        prompt = torch.tensor([ids[:PROMPT]])
        plan = snlp.Plan(n_par=model.config.n_layer // 2, iters=1)
        print(f"== {name} ({directory})")
        group = speculative_rows(model, prompt, NEW, {plan_name(plan): plan}, DRAFT_LENS, TEMPERATURES,
                                 repeats=args.repeats, graphed=True)
        rows += [{"group": name, **row} for row in group]
        runs[name] = str(directory)
    results = {**environment(torch.device("cpu")), "runs": runs, "prompt_tokens": PROMPT, "new_tokens": NEW,
               "repeats": args.repeats, "warmup": 1, "top_k": None,
               "seeds": "repeat r samples with seed r (temperature > 0); statistics pooled over the repeats",
               "rows": rows}
    write_json(args.out, results)
    lines = [f"# Speculative decoding on the demo's models ({results['device']}, {results['threads']} threads, "
             f"torch {results['torch']})", "",
             f"`python benchmarks/speculative.py`: prompt {PROMPT} validation tokens, {NEW} new tokens, median of "
             f"{args.repeats} runs, top-k off; the tables in milliseconds per token.", ""]
    for name in runs:
        group = [r for r in rows if r["group"] == name]
        lines += [f"## {name}", "", f"x fastest over: {baselines(group)}", "", "```", *speculative_table(group), "```",
                  ""]
    write_atomic(args.out.with_suffix(".md"), lambda f: f.write("\n".join(lines).encode()))
    save_figure(analysis.plot_speculation(rows, "speculative decoding, the demo's models (IDN n4 K1 drafts)"),
                args.out.with_suffix(".png"))
    print("\n".join(lines))
    print(f"wrote {args.out}, .md and .png")


if __name__ == "__main__":
    main()
