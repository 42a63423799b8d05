"""Layer-parallel decoding across processes beside the fastest way to decode in one process, on the same machine, the
same total cores and the same weights. The model is nanochat-shaped with trained-like random weights (output
projections N(0, 0.02)) and the embedded corpus's tokenizer, decoding greedily at batch 1. Five ways, ms per token:

- one process, 1 thread, sequential; one process, P x t threads, sequential (eager, and with compiled blocks and a
  static cache): the fastest of these is the baseline every ratio divides;
- the P-stage pipeline and SNLP over P stages, P processes x t threads (`snlp generate --stages P --bench` under
  torchrun), the pipeline being the second baseline;
- SNLP IDN n = L/2 K1 in one process with P x t threads.

    python benchmarks/stages.py --out benchmarks/results/cpu-stages.json         # L24 D256, 2 x 1 thread

Each round is one torchrun of the stage bench (`--repeats` interleaved sequences per mode) and one set of
interleaved one-process sequences; the JSON keeps every round and the medians over them, since two busy processes
on a small machine vary from run to run.
    python benchmarks/stages.py --depth 32 --width 1280 --stages 4 --threads 0   # the GPU row (one GPU per rank)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import layersolve as ls  # noqa: E402
from models.inference.decode import Decoder  # noqa: E402
from models.inference.snlp import Plan  # noqa: E402
from models.io import write_json  # noqa: E402
from models.nanochat import GPT, GPTConfig, checkpoint  # noqa: E402
from models.tools.bench import environment  # noqa: E402
from models.training.data import default_tokenizer  # noqa: E402
from models.training.tokenizer import Tokenizer  # noqa: E402

PROMPT = "ROMEO."  # snlp generate's default prompt, which the stage bench decodes after


def per_token(model: GPT, prompt: torch.Tensor, new: int, plan: Plan | None, static: bool = False) -> float:
    """Median seconds of a decoding step after the prompt's, greedy, one sequence of `new` tokens."""
    decoder = Decoder(model, plan, capacity=prompt.shape[1] + new, static=static)
    logits = decoder.step(prompt)[:, -1]
    seconds = []
    for _ in range(new):
        token = logits.argmax(dim=-1, keepdim=True)
        start = time.perf_counter()
        logits = decoder.step(token)[:, -1]
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def one_process(model: GPT, compiled: GPT, prompt: torch.Tensor, new: int, threads: int, repeats: int) -> dict:
    """ms per token of the one-process ways, interleaved over `repeats` sequences (threads set per call)."""
    plan = Plan(n_par=model.config.n_layer // 2, jacobian=ls.Identity(), iters=1)
    ways = {"one process, 1 thread, sequential": (1, lambda: per_token(model, prompt, new, None)),
            f"one process, {threads} threads, sequential": (threads, lambda: per_token(model, prompt, new, None)),
            f"one process, {threads} threads, sequential compiled": (
                threads, lambda: per_token(compiled, prompt, new, None, static=True)),
            f"one process, {threads} threads, SNLP IDN n{plan.n_par} K1": (
                threads, lambda: per_token(model, prompt, new, plan))}
    times = {name: [] for name in ways}
    for r in range(repeats + 1):  # the first round warms up (and compiles)
        for name, (n, call) in ways.items():
            torch.set_num_threads(n)
            seconds = call()
            if r:
                times[name].append(seconds)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab-size", type=int, default=2048, help="the tokenizer of the embedded corpus at this size")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--iters", type=int, default=1)
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="CPU threads per process (0: torch's default)")
    p.add_argument("--rounds", type=int, default=5, help="torchrun launches, each a full bench")
    p.add_argument("--timeout", type=int, default=120)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    cfg = GPTConfig(sequence_len=256, vocab_size=args.vocab_size, n_layer=args.depth,
                    n_head=args.width // args.head_dim, n_kv_head=args.width // args.head_dim, n_embd=args.width)
    with tempfile.TemporaryDirectory() as directory:
        model = GPT(cfg)
        model.init_weights(seed=0, output_std=0.02)
        checkpoint.save(model, directory, 1)
        default_tokenizer(ROOT / "snlp-out" / "cache", args.vocab_size).save(Path(directory) / "tokenizer")
        del model
        env = dict(os.environ)
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.stages}",
                   "-m", "models.tools.cli", "generate", directory, "--stages", str(args.stages), "--iters",
                   str(args.iters), "--bench", "--temperature", "0", "--max-new", str(args.max_new), "--repeats",
                   str(args.repeats), "--timeout", str(args.timeout), "--out", str(Path(directory) / "round.json")]
        threads = args.threads * args.stages if args.threads else torch.get_num_threads()
        model = checkpoint.load(directory).eval()
        compiled = checkpoint.load(directory).eval().compile_blocks()
        tokenizer = Tokenizer.load(Path(directory) / "tokenizer")
        prompt = torch.tensor([tokenizer.encode(PROMPT, prepend=tokenizer.get_bos_token_id())])
        rounds = []
        for r in range(args.rounds):
            if subprocess.run(command, cwd=ROOT, env=env).returncode:
                return 1
            staged = json.loads((Path(directory) / "round.json").read_text())
            latency = one_process(model, compiled, prompt, args.max_new, threads, args.repeats)
            per = f"{args.stages} processes x {args.threads or 'default'} thread{'' if args.threads == 1 else 's'}"
            latency[f"pipeline, {per}"] = staged["latency_ms"]["pipeline"]
            latency[f"SNLP {staged['plan'].removeprefix('SNLP ')} over {per}"] = staged["latency_ms"][staged["plan"]]
            rounds.append({"latency_ms": latency, "top1_agreement": staged["top1_agreement"], "staged": staged})
            print(f"round {r + 1}: " + ", ".join(f"{k}: {v:.2f}" for k, v in latency.items()), flush=True)
    medians = {name: statistics.median(r["latency_ms"][name] for r in rounds) for name in rounds[0]["latency_ms"]}
    sequential = {name: ms for name, ms in medians.items() if name.startswith("one process") and "SNLP" not in name}
    fastest = min(sequential, key=sequential.get)
    pipeline = next(name for name in medians if name.startswith("pipeline"))
    lines = [f"{'way':<58} {'ms/token':>9} {'x fastest':>10} {'x pipeline':>11}"]
    for name, ms in medians.items():
        lines.append(f"{name:<58} {ms:>9.2f} {medians[fastest] / ms:>9.2f}x {medians[pipeline] / ms:>10.2f}x")
    lines += ["", f"medians over {args.rounds} rounds; baseline: the fastest sequential way on this machine and these "
              f"{threads} cores, \"{fastest}\"; x pipeline: the {args.stages}-stage pipeline's ratio; SNLP's top-1 "
              f"agreement with the pipeline's tokens {statistics.mean(r['top1_agreement'] for r in rounds):.3f}"]
    print("\n".join(lines))
    if args.out is not None:
        first = rounds[0]["staged"]
        result = {"environment": environment(torch.device("cpu")), "stages": args.stages, "plan": first["plan"],
                  "shape": first["shape"], "repeats": args.repeats, "threads_per_process": args.threads,
                  "total_threads": threads, "median_latency_ms": medians, "baseline": fastest,
                  "speedup_over_fastest_sequential": {n: medians[fastest] / ms for n, ms in medians.items()},
                  "speedup_over_pipeline": {n: medians[pipeline] / ms for n, ms in medians.items()},
                  "rounds": [{k: r[k] for k in ("latency_ms", "top1_agreement")} for r in rounds],
                  "table": lines, "command": " ".join(["python", "benchmarks/stages.py", *sys.argv[1:]])}
        print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
