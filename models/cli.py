"""The `snlp` command: argparse at the edge, library calls inside."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Subcommands whose work belongs to later issues: they say so rather than pretend.
LATER = {
    "train": "training with SNLP-aware regularization arrives with the training issue (#4)",
    "eval": "the PPL / agreement grid arrives with the training and evaluation issue (#4)",
    "bench": "model benchmarks arrive with the models issue (#3)",
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
    for name, why in LATER.items():
        sub.add_parser(name, help=f"(not yet: {why})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in LATER:
        print(f"snlp {args.command}: not implemented yet: {LATER[args.command]}.", file=sys.stderr)
        return 2
    from . import demo

    if args.layers < 1 or args.width < 1:
        print("snlp demo: --layers and --width must be positive", file=sys.stderr)
        return 2
    demo.run(args.out, demo.ToyConfig(layers=args.layers, width=args.width, seed=args.seed))
    print("(the model demo on the embedded corpus arrives with the training issue (#4))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
