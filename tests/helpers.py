"""Shared problem builders and hypothesis strategies.

The problems are well posed on purpose: every block is h -> a_l h + g * tanh(h W_l^T + c_l) with |a_l| <= 1 and
a small gain g on a normalized W, so each layer's Jacobian is bounded and mildly nonlinear. Finite termination
holds for any system, but the convergence-rate tests need the surrogate error J - J~ to be small, and float64
comparisons at 1e-10 need a trace that does not blow up over depth.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

import layersolve as ls

DTYPE = torch.float64


def residual_blocks(num_layers: int, width: int, *, seed: int, gain: float = 0.3, scales=None):
    """Stacked parameters of blocks f_l(h) = a_l h + gain * tanh(h W_l^T + c_l), acting on the last state dim."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(num_layers, width, width, generator=g, dtype=DTYPE) / width ** 0.5
    c = 0.1 * torch.randn(num_layers, width, generator=g, dtype=DTYPE)
    a = torch.ones(num_layers, dtype=DTYPE) if scales is None else torch.as_tensor(scales, dtype=DTYPE)
    return {"w": w, "c": c, "a": a, "gain": torch.full((num_layers,), gain, dtype=DTYPE)}


def residual_block(p, h):
    return p["a"] * h + p["gain"] * torch.tanh(h @ p["w"].T + p["c"])


def residual_system(num_layers: int, width: int, *, seed: int, gain: float = 0.3, scales=None) -> ls.LayerSystem:
    params = residual_blocks(num_layers, width, seed=seed, gain=gain, scales=scales)
    return ls.LayerSystem.from_function(residual_block, params, scales=params["a"])


def doubly_stochastic(num_layers: int, streams: int, *, seed: int) -> torch.Tensor:
    """Random doubly stochastic matrices (L, S, S) by Sinkhorn on positive entries: well-conditioned mixing like
    mHC's H_res, with spectral radius 1 so the trace neither explodes nor vanishes over depth."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(num_layers, streams, streams, generator=g, dtype=DTYPE) + 0.1
    for _ in range(200):
        m = m / m.sum(-1, keepdim=True)
        m = m / m.sum(-2, keepdim=True)
    return m


def mixing_system(num_layers: int, streams: int, width: int, *, seed: int, gain: float = 0.05) -> ls.LayerSystem:
    """f_l(h) = M_l h + gain * tanh(h W_l^T + c_l) on states (S, D): M_l mixes the S streams (dim 0), and the
    nonlinear branch is small, so Mixing(M) is close to the true Jacobian and Identity is not."""
    params = residual_blocks(num_layers, width, seed=seed, gain=gain)
    params["m"] = doubly_stochastic(num_layers, streams, seed=seed + 1)

    def block(p, h):  # h: (S, D)
        return p["m"] @ h + p["gain"] * torch.tanh(h @ p["w"].T + p["c"])

    return ls.LayerSystem.from_function(block, params, mixing=params["m"], stream_dim=0)


def random_state(shape, *, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


@st.composite
def problems(draw, max_layers: int = 8):
    """(system, h0): L layers on a state of 1-3 dims whose last dim is the block width; the first dim is a
    stream axis of a mixing system when one is drawn."""
    num_layers = draw(st.integers(1, max_layers))
    width = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    if draw(st.booleans()):
        streams = draw(st.integers(1, 3))
        system = mixing_system(num_layers, streams, width, seed=seed, gain=draw(st.sampled_from([0.05, 0.5])))
        shape = (streams, width)
    else:
        lead = draw(st.lists(st.integers(1, 3), max_size=1))
        scales = draw(st.lists(st.floats(0.5, 1.0), min_size=num_layers, max_size=num_layers))
        system = residual_system(num_layers, width, seed=seed, gain=draw(st.sampled_from([0.3, 1.0])), scales=scales)
        shape = (*lead, width)
    return system, random_state(shape, seed=seed + 7)


KINDS = ("Zero", "Identity", "Scaled", "Mixing", "Diagonal", "Exact(Sweep)", "Exact(Dense)", "Exact(GMRES)")


def strategies_for(system: ls.LayerSystem, state: torch.Tensor) -> dict[str, list[ls.Jacobian]]:
    """Every Jacobian strategy applicable to the system, by kind (one of KINDS). Mixing uses the system's own
    matrices when it has them, else random ones on state dim 0."""
    mixing = ls.Mixing() if system.mixing is not None else \
        ls.Mixing(doubly_stochastic(system.num_layers, state.shape[0], seed=3), dim=0)
    return {
        "Zero": [ls.Zero()],
        "Identity": [ls.Identity()],
        "Scaled": [ls.Scaled(0.7)] + ([ls.Scaled()] if system.scales is not None else []),
        "Mixing": [mixing],
        "Diagonal": [ls.Diagonal(), ls.Diagonal(probes=2)],
        "Exact(Sweep)": [ls.Exact()],
        "Exact(Dense)": [ls.Exact(method=ls.Dense())],
        "Exact(GMRES)": [ls.Exact(method=ls.GMRES()), ls.Exact(method=ls.GMRES(preconditioner=mixing))],
    }


def all_strategies(system: ls.LayerSystem, state: torch.Tensor) -> list[ls.Jacobian]:
    return [j for kind in strategies_for(system, state).values() for j in kind]


INITS = [ls.Repeat(), ls.OneStep(), "given"]


def make_init(kind, system, h0, *, seed: int):
    """Resolve an init drawn from INITS; "given" is a random finite trace near h0."""
    if kind != "given":
        return kind
    noise = random_state((system.num_layers + 1, *h0.shape), seed=seed)
    return ls.Given(h0 + 0.1 * noise)


# -- nanochat models ---------------------------------------------------------------------------------------------

# Configurations the model tests run over: with and without x0 / value embeddings, GQA, sliding windows that bind
# (sequence_len 256: the short window is 128 tokens, and tests use 150 > 128), mHC with and without x0.
MODEL_CONFIGS = {
    "default": dict(),
    "no_x0_no_ve": dict(no_x0_resid=True, no_ve=True),
    "gqa": dict(n_head=4, n_kv_head=2),
    "mhc": dict(use_mhc=True, mhc_num_streams=2),
    "mhc_no_ve": dict(use_mhc=True, mhc_num_streams=3, no_ve=True),
}
SEQ_LEN = 150


def tiny_config(**overrides):
    from models.nanochat.config import GPTConfig

    base = dict(sequence_len=256, vocab_size=100, n_layer=6, n_head=2, n_kv_head=1, n_embd=32, window_pattern="SSSL")
    return GPTConfig(**{**base, **overrides})


def random_model(cfg, *, seed: int = 0, dtype=torch.float64, scale: float = 0.15):
    """A model with every parameter random and non-zero. nanochat zero-initializes both output projections, which
    would hide any bug in what they multiply; the small scale keeps the blocks mildly nonlinear, like a trained
    network's, so surrogate solves do not overflow before K = n_par."""
    from models.nanochat.gpt import GPT

    model = GPT(cfg).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
            p.copy_(noise * (scale if p.ndim > 1 else 0.2) + (1.0 if name == "resid_lambdas" else 0.0))
    return model.requires_grad_(False)


def tokens(batch: int, length: int, vocab: int = 100, *, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def skip_path_model(cfg, *, seed: int = 0):
    """A random model whose every block is exactly its skip path, an affine map of its input h: both output
    projections zero, so the attention and MLP branches add nothing; with dynamic mHC also a zero dyn_proj, so the
    per-token connection matrices are the constants their logits give and do not depend on h."""
    model = random_model(cfg, seed=seed)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
            if cfg.mhc_dynamic:
                block.hc_attn.dyn_proj.weight.zero_()
                block.hc_mlp.dyn_proj.weight.zero_()
    return model


# -- Hugging Face models -----------------------------------------------------------------------------------------

HF_VOCAB = 97
HF_WINDOW = 5  # below the tests' prompt + new tokens, so that the sliding windows bind
HF_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3"]


def tiny_hf_config(family: str, layers: int = 4):
    """A tiny random config of a family; the windowed families mix sliding and full layers as their models do."""
    import transformers as t

    common = dict(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, head_dim=8)
    sliding, full = "sliding_attention", "full_attention"
    return {
        "llama": lambda: t.LlamaConfig(**common),
        "mistral": lambda: t.MistralConfig(**common, sliding_window=HF_WINDOW),
        "qwen2": lambda: t.Qwen2Config(**common),
        "qwen3": lambda: t.Qwen3Config(**common),
        "gemma2": lambda: t.Gemma2Config(**common, sliding_window=HF_WINDOW,
                                         layer_types=[sliding, full] * (layers // 2) + [sliding] * (layers % 2)),
        "gemma3": lambda: t.Gemma3TextConfig(**common, sliding_window=HF_WINDOW,
                                             layer_types=([sliding] * 3 + [full]) * (layers // 4) +
                                             [sliding] * (layers % 4)),
    }[family]()


def tiny_hf_lm(family: str, layers: int = 4, seed: int = 0):
    """A tiny random transformers model of a family, float64, eval mode."""
    import transformers

    config = tiny_hf_config(family, layers)
    # Gemma2's attention softcap runs under eager attention only (transformers' default for it)
    config._attn_implementation = "eager" if family.startswith("gemma") else "sdpa"
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).to(torch.float64).eval()


def tiny_tokenizer(texts):
    """A byte-level BPE tokenizer trained on `texts` (no hub here), with BOS / EOS."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
