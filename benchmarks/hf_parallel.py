"""The two ways `models.hf` evaluates decoder layers in parallel, side by side on the same weights: one vmap call
over the layers' stacked weights, and a loop over the layer modules; with the model's own forward and the
adapter's sequential trace beside them. A random Llama (transformers' init), batch 1, interleaved repeats, medians.

    python benchmarks/hf_parallel.py --out benchmarks/results/cpu-hf-parallel.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import hf  # noqa: E402
from models.io import write_json  # noqa: E402
from models.tools.bench import environment, interleaved, timer  # noqa: E402


def median_ms(calls: dict, warmup: int, repeats: int) -> dict:
    times = interleaved(calls, timer(torch.device("cpu")), warmup, repeats)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main() -> int:
    import transformers

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--tail", type=int, default=6, help="layers evaluated in one parallel call")
    p.add_argument("--tokens", type=int, nargs="+", default=[16, 256])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=args.width, intermediate_size=4 * args.width,
                                      num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                                      max_position_embeddings=max(args.tokens))
    config._attn_implementation = "sdpa"
    lm = transformers.LlamaForCausalLM(config).eval()
    vmap, loop = hf.HFModel(lm, "vmap"), hf.HFModel(lm, "loop")
    first = args.layers - args.tail
    rows = []
    with torch.no_grad():
        for tokens in args.tokens:
            idx = torch.randint(0, 512, (1, tokens))
            emb = vmap.embed(idx)
            inputs = emb.x0.expand(args.tail, *emb.x0.shape).contiguous()
            extra = vmap.layer_inputs(emb, first, args.tail)
            ms = median_ms({"vmap": lambda: vmap.layers.evaluate(first, inputs, extra),
                            "loop": lambda: loop.layers.evaluate(first, inputs, extra),
                            "model forward": lambda: lm(idx, use_cache=False),
                            "adapter trace": lambda: vmap.trace(vmap.embed(idx))}, 2, args.repeats)
            rows.append({"tokens": tokens, "ms": ms, "vmap_over_loop": ms["loop"] / ms["vmap"]})
            print(f"T {tokens:>4}: {args.tail} layers vmap {ms['vmap']:.2f} ms, loop {ms['loop']:.2f} ms "
                  f"({ms['loop'] / ms['vmap']:.2f}x); all {args.layers} layers: model forward "
                  f"{ms['model forward']:.2f} ms, adapter trace {ms['adapter trace']:.2f} ms")
    if args.out:
        write_json(args.out, {"environment": environment(torch.device("cpu")), "layers": args.layers,
                              "width": args.width, "tail": args.tail, "repeats": args.repeats, "rows": rows})
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
