"""Side-by-side timing against the published SNLP code (phymhan/nanochat-snlp), on the same weights, in one process.

The published code is a peer, never a dependency: point --peer at a checkout of it (its `nanochat/` and `snlp/`
folders). Its inference module imports the tokenizer stack through `nanochat.engine`; the timed paths never touch
a tokenizer, so a stub stands in for `nanochat.tokenizer` rather than installing HF `tokenizers` for nothing.

    python benchmarks/peer.py --peer /path/to/nanochat-snlp --out benchmarks/results/cpu-peer.json

Setup (as in the issue that asked for it): float32, nanochat GPT without x0 / resid blend and value embeddings,
full windows, n_par = L / 2, the same weights (ours saved, loaded into the peer's GPT). Rows interleave the two
codes call by call, alternating which runs first; the table reports median times and the speed, the median over
rounds of peer time / our time within a round (> 1: ours is faster).

Whole calls as a user makes them, in each context a user writes: under `torch.no_grad()`, under
`torch.inference_mode()`, and (decoding) with no context at all. The published functions enter inference mode
themselves; our decoders do too, while `snlp.forward` keeps the caller's context (training differentiates it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import layersolve as ls  # noqa: E402
from models import nanochat, snlp  # noqa: E402
from models.inference.decode import generate  # noqa: E402
from models.tools.bench import environment, interleaved, timer  # noqa: E402

SHAPES = [(12, 128, 256), (24, 256, 512)]  # (layers, width, tokens)
# the caller's context -> whether prefill rows are timed in it (a forward with grad enabled builds a graph: training)
CONTEXTS = {"no_grad": (torch.no_grad, True), "inference_mode": (torch.inference_mode, True),
            "no context": (contextlib.nullcontext, False)}


def import_peer(path: Path):
    stub = types.ModuleType("nanochat.tokenizer")
    stub.get_tokenizer = stub.get_token_bytes = None
    sys.modules["nanochat.tokenizer"] = stub
    sys.path.insert(0, str(path))
    import nanochat.gpt as peer_gpt  # the peer's package is top-level `nanochat`; ours is `models.nanochat`
    import snlp.inference_idn as peer_idn
    return peer_gpt, peer_idn


def twin_models(peer_gpt, layers: int, width: int, tokens: int):
    """Our model with trained-like weights, and the peer's GPT loaded from our checkpoint."""
    cfg = nanochat.GPTConfig(sequence_len=tokens, vocab_size=8192, n_layer=layers, n_head=width // 64,
                             n_kv_head=width // 64, n_embd=width, window_pattern="L", no_x0_resid=True, no_ve=True)
    ours = nanochat.GPT(cfg)
    ours.init_weights(seed=0, output_std=0.02)
    ours.eval()
    peer = peer_gpt.GPT(peer_gpt.GPTConfig(sequence_len=tokens, vocab_size=8192, n_layer=layers, n_head=width // 64,
                                           n_kv_head=width // 64, n_embd=width, window_pattern="L",
                                           no_x0_resid=True, no_ve=True))
    with tempfile.TemporaryDirectory() as run:
        nanochat.save(ours, run, step=0)
        state = torch.load(Path(run) / "model_000000.pt", map_location="cpu")
    missing, unexpected = peer.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith(("cos", "sin")) for k in missing):
        raise RuntimeError(f"peer checkpoint mismatch: missing {missing}, unexpected {unexpected}")
    return ours, peer.eval()


def side_by_side(cases: dict[str, tuple], repeats: int) -> dict[str, dict]:
    """cases: name -> (ours, peer) callables, timed `interleaved`: each round runs every call once, our call and the
    peer's side by side, rounds alternating direction (so each code runs first in half the pairs). The speed is the
    median of the per-round ratios: a pair's two calls run within a second, so a drift of this shared machine's
    speed between rounds (10-20% over minutes, measured) cancels in each ratio."""
    calls = {(name, code): call for name, pair in cases.items() for code, call in zip(("ours", "peer"), pair)}
    times = interleaved(calls, timer(torch.device("cpu")), warmup=2, repeats=repeats)
    rows = {}
    for name in cases:
        a, b = times[name, "ours"], times[name, "peer"]
        rows[name] = {"ours_ms": 1e3 * statistics.median(a), "peer_ms": 1e3 * statistics.median(b),
                      "ours_spread_ms": [1e3 * min(a), 1e3 * max(a)], "peer_spread_ms": [1e3 * min(b), 1e3 * max(b)],
                      "speed": statistics.median(p / o for o, p in zip(a, b))}
    return rows


def prefill_cases(ours, peer, peer_idn, layers: int, tokens: int) -> dict[str, tuple]:
    n = layers // 2
    idx = torch.randint(0, 8192, (1, tokens), generator=torch.Generator().manual_seed(0))
    par = list(range(layers - n, layers))
    pw = peer_idn.PrecomputedWeights(peer, par)
    chunks = [peer_idn.ChunkWeights(peer, par[i:i + 2]) for i in range(0, n, 2)]
    plan = lambda k, fuse=1: snlp.Plan(n_par=n, jacobian=ls.Identity(), iters=k, fuse=fuse)  # noqa: E731
    with torch.no_grad():  # the two codes compute the same function: check before timing
        torch.testing.assert_close(ours(idx), peer_idn.forward_sequential(peer, idx), rtol=1e-4, atol=1e-4)
    return {
        "sequential": (lambda: ours(idx), lambda: peer_idn.forward_sequential(peer, idx)),
        f"IDN n{n} K1": (lambda: snlp.forward(ours, idx, plan(1)),
                         lambda: peer_idn.forward_idn_batched(peer, idx, layers - n, pw, K=1)),
        f"IDN n{n} K2": (lambda: snlp.forward(ours, idx, plan(2)),
                         lambda: peer_idn.forward_idn_batched(peer, idx, layers - n, pw, K=2)),
        f"{n // 2}xF2 K1": (lambda: snlp.forward(ours, idx, plan(1, 2)),
                            lambda: peer_idn.forward_chunkwise(peer, idx, layers - n, pw, chunks, K=1)),
    }


def decode_cases(ours, peer, peer_idn, layers: int, new_tokens: int) -> dict[str, tuple]:
    n = layers // 2
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]
    idx = torch.tensor([prompt])
    pw = peer_idn.PrecomputedWeights(peer, list(range(layers - n, layers)))
    cases = {"decode sequential": (lambda: generate(ours, idx, new_tokens),
                                   lambda: peer_idn.ar_generate_sequential(peer, prompt, new_tokens))}
    # The same initial guess in both codes: repeat (the peer's "h0") and warm (the peer's default for generation).
    for k in (1, 2):
        for ours_init, peer_init in (("repeat", "h0"), ("warm", "warm")):
            plan = snlp.Plan(n_par=n, jacobian=ls.Identity(), iters=k, init=ours_init)
            cases[f"decode IDN n{n} K{k} {ours_init}"] = (
                lambda plan=plan: generate(ours, idx, new_tokens, plan=plan),
                lambda k=k, init=peer_init: peer_idn.ar_generate_idn_batched(peer, prompt, pw, layers - n, new_tokens,
                                                                             K=k, init=init))
    return cases


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", type=Path, required=True, help="a checkout of phymhan/nanochat-snlp")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, help="JSON results")
    args = p.parse_args(argv)
    if not (args.peer / "snlp" / "inference_idn.py").is_file():
        p.error(f"--peer {args.peer}: no snlp/inference_idn.py there (expected a checkout of nanochat-snlp)")
    peer_gpt, peer_idn = import_peer(args.peer)
    results = {"environment": environment(torch.device("cpu")), "repeats": args.repeats,
               "new_tokens": args.new_tokens, "shapes": {}}
    lines = []
    for layers, width, tokens in SHAPES:
        ours, peer = twin_models(peer_gpt, layers, width, tokens)
        name = f"L{layers} D{width} T{tokens}"
        results["shapes"][name] = {}
        for context, (enter, prefill) in CONTEXTS.items():
            with enter():
                rows = side_by_side(prefill_cases(ours, peer, peer_idn, layers, tokens), args.repeats) if prefill \
                    else {}
                decode = side_by_side(decode_cases(ours, peer, peer_idn, layers, args.new_tokens), args.repeats)
            for row in decode.values():  # per generated token
                for key in ("ours_ms", "peer_ms"):
                    row[key + "_per_token"] = row[key] / args.new_tokens
            rows.update(decode)
            results["shapes"][name][context] = rows
            lines += ["", f"{name}, {context}  (median of {args.repeats}; decode rows per token; speed = median of "
                      "peer time / our time per round, > 1: ours is faster)"]
            for case, r in rows.items():
                scale = args.new_tokens if case.startswith("decode") else 1
                lines.append(f"  {case:<26} ours {r['ours_ms'] / scale:8.2f} ms   peer {r['peer_ms'] / scale:8.2f} ms"
                             f"   {r['speed']:.2f}x")
            print("\n".join(lines[-len(rows) - 2:]), flush=True)
    if args.out:
        from models.io import write_atomic, write_json
        write_json(args.out, results)
        table = f"# benchmarks/peer.py\n\n```\n{results['environment']}\n" + "\n".join(lines) + "\n```\n"
        write_atomic(args.out.with_suffix(".md"), lambda f: f.write(table.encode()))
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
