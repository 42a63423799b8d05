"""The `snlp` command: argparse at the edge, library calls inside."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# Subcommands whose work belongs to later issues: they say so rather than pretend.
LATER = {
    "train": "training with SNLP-aware regularization arrives with the training issue (#4)",
    "eval": "the PPL / agreement grid arrives with the training and evaluation issue (#4)",
    "generate": "KV-cache and SNLP decoding arrive with the models issue (#3)",
    "study": "studies arrive with the analysis notebooks",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snlp", description="Layer-parallel inference (SNLP) with layersolve.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="the main job: solve a toy residual stack with every strategy and report")
    demo.add_argument("--out", type=Path, default=Path("snlp-out/demo"), help="directory for JSON and plots")
    demo.add_argument("--layers", type=int, default=24, help="number of residual blocks (default 24)")
    demo.add_argument("--width", type=int, default=32, help="state width (default 32)")
    demo.add_argument("--seed", type=int, default=0)
    bench = sub.add_parser("bench", help="prefill wall time: sequential vs SNLP plans on a random tiny model")
    bench.add_argument("--out", type=Path, default=Path("snlp-out/bench"), help="directory for bench.json")
    bench.add_argument("--depth", type=int, default=8, help="layers (default 8)")
    bench.add_argument("--width", type=int, default=128, help="n_embd, a multiple of 64 (default 128)")
    bench.add_argument("--tokens", type=int, default=256, help="sequence length (default 256)")
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--repeats", type=int, default=10)
    bench.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for name, why in LATER.items():
        sub.add_parser(name, help=f"(not yet: {why})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in LATER:
        print(f"snlp {args.command}: not implemented yet: {LATER[args.command]}.", file=sys.stderr)
        return 2
    if args.command == "bench":
        return _bench(args)
    from . import demo

    if args.layers < 1 or args.width < 1:
        print("snlp demo: --layers and --width must be positive", file=sys.stderr)
        return 2
    demo.run(args.out, demo.ToyConfig(layers=args.layers, width=args.width, seed=args.seed))
    print("(the model demo on the embedded corpus arrives with the training issue (#4))")
    return 0


def _bench(args) -> int:
    from analysis import write_json

    from . import bench
    from .gpt import GPT, GPTConfig

    if args.width % 64 or args.depth < 2 or args.tokens < 2:
        print("snlp bench: --width must be a multiple of 64, --depth and --tokens at least 2", file=sys.stderr)
        return 2
    cfg = GPTConfig(sequence_len=max(args.tokens, 128), vocab_size=512, n_layer=args.depth,
                    n_head=args.width // 64, n_kv_head=args.width // 64, n_embd=args.width)
    model = GPT(cfg)
    model.init_weights(seed=0)
    with torch.no_grad():  # nanochat zero-initializes the output projections; give the blocks something to do
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
    model = model.to(args.device).eval()
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens), device=args.device)
    results = bench.run(model, idx, bench.default_cases(cfg.n_layer), repeats=args.repeats)
    print(bench.table(results))
    write_json(args.out / "bench.json", results)
    print(f"wrote {args.out / 'bench.json'} (random weights: the quality columns only show the plans run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
