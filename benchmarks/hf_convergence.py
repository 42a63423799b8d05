"""IDN and Jacobi convergence through models.hf on random models (transformers' init, float64): a Llama and a
Gemma3 (sliding and full layers, per-type rotary), 8 layers, the last half solved at K = 1, 2, 4. Prints the
largest relative error of the tail against the sequential trace and the top-1 agreement of the logits.

    python benchmarks/hf_convergence.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import layersolve as ls  # noqa: E402
from models import hf, snlp  # noqa: E402

SHAPE = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, head_dim=32)
N_PAR = 4  # the last half


def models():
    import transformers

    yield "random Llama", transformers.LlamaConfig(**SHAPE), "sdpa"
    yield "random Gemma3", transformers.Gemma3TextConfig(
        **SHAPE, sliding_window=16, layer_types=(["sliding_attention"] * 3 + ["full_attention"]) * 2), "eager"


@torch.no_grad()
def main() -> int:
    import transformers

    idx = torch.randint(0, SHAPE["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(1))
    for name, config, attention in models():
        config._attn_implementation = attention
        torch.manual_seed(0)
        model = hf.HFModel(transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval())
        reference = model(idx)
        for label, jacobian in (("IDN", ls.Identity()), ("Jacobi", ls.Zero())):
            cells = []
            for k in (1, 2, 4):
                plan = snlp.Plan(n_par=N_PAR, jacobian=jacobian, iters=k)
                _, exact = snlp.sequential_trace(model, idx, plan)
                out = snlp.forward(model, idx, plan, reference=exact)
                agree = float((out.logits.argmax(-1) == reference.argmax(-1)).float().mean())
                cells.append(f"K{k}: err {float(out.stats.error[-1].max()):.1e}, top-1 {agree:.3f}")
            print(f"{name:<14} {label:<7} n{N_PAR} of {SHAPE['num_hidden_layers']} | " + " | ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
