"""Layer-parallel decoding across processes: the P-stage pipeline against SNLP over stages, on the same processes
and weights (`snlp generate --stages P --bench` under torchrun). The model is nanochat-shaped with trained-like
random weights (output projections N(0, 0.02)) and the embedded corpus's tokenizer, decoding greedily at batch 1.

    python benchmarks/stages.py --out benchmarks/results/cpu-stages.json         # L24 D256, 2 x 1 thread

Each round is one torchrun of the bench (`--repeats` interleaved sequences per mode); the JSON keeps every round
and the median speedup over them, since two busy processes on a small machine vary from run to run.
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
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.io import write_json  # noqa: E402
from models.nanochat import GPT, GPTConfig, checkpoint  # noqa: E402
from models.training.data import default_tokenizer  # noqa: E402


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
        rounds = []
        for _ in range(args.rounds):
            if subprocess.run(command, cwd=ROOT, env=env).returncode:
                return 1
            rounds.append(json.loads((Path(directory) / "round.json").read_text()))
    speedups = [r["speedup"] for r in rounds]
    print(f"speedup over {args.rounds} rounds: median {statistics.median(speedups):.2f}x, "
          f"range {min(speedups):.2f}x .. {max(speedups):.2f}x")
    if args.out is not None:
        result = {key: rounds[0][key] for key in ("environment", "stages", "plan", "shape", "repeats")}
        result.update(rounds=[{k: r[k] for k in ("latency_ms", "speedup", "top1_agreement")} for r in rounds],
                      median_speedup=statistics.median(speedups), min_speedup=min(speedups),
                      max_speedup=max(speedups), threads_per_process=args.threads,
                      command=" ".join(["python", "benchmarks/stages.py", *sys.argv[1:]]))
        print(f"wrote {write_json(args.out, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
