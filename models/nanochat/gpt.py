"""nanochat's GPT (karpathy/nanochat gpt.py) with the SNLP fork's options (no_x0_resid, no_ve, mHC), as plain modules
whose parameter names are nanochat's state_dict keys. The block math lives in `layers.block_forward`, shared with
the layer-parallel path; this file holds the parameters, the embedding side (smear, value embeddings, x0) and the
head side (backout, final norm, softcapped logits).

Features: rotary embeddings (base 100000), QK norm scaled by 1.2, ReLU^2 MLP, parameter-free RMSNorm (also right
after the embedding), untied embedding / lm_head, no biases, GQA, sliding windows tiled over layers (last layer
full), resid / x0 lambdas, gated value embeddings on alternating layers, a previous-token smear, a backout of the
mid-depth state, a vocabulary padded to a multiple of 64, logit softcap 15.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

import layersolve as ls

from .fusion import fuse_value_embeddings, fuse_weights
from .block import BlockWeights, Context, at_least_float32, block_forward, norm, rotary_tables
from .mhc import HCWeights, HyperConnection, sinkhorn_log

SOFTCAP = 15.0
SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the embedding
PAD_VOCAB_TO = 64


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key / value heads (GQA)
    n_embd: int = 768
    window_pattern: str = "SSSL"  # tiled over layers; S = quarter context (rounded up to 128), L = full
    # The SNLP fork's options.
    no_x0_resid: bool = False  # no resid / x0 blend before blocks
    no_ve: bool = False  # no value embeddings
    use_mhc: bool = False  # hyper-connections with mhc_num_streams residual streams
    mhc_num_streams: int = 4
    mhc_sinkhorn_iters: int = 10
    mhc_sinkhorn_tau: float = 0.05
    num_mtp_steps: int = 0  # multi-token prediction heads (their weights load; the forward does not use them)
    mtp_loss_weight: float = 0.3
    # Ours: DeepSeek-style input-dependent hyper-connections.
    mhc_dynamic: bool = False

    def __post_init__(self):
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        elif (self.n_embd // self.n_head) % 2:
            problems.append(f"head_dim={self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            problems.append(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
            problems.append(f"window_pattern={self.window_pattern!r} must be a non-empty string of S and L")
        if self.mhc_dynamic and not self.use_mhc:
            problems.append("mhc_dynamic needs use_mhc=True")
        if problems:
            raise ValueError("GPTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / PAD_VOCAB_TO) * PAD_VOCAB_TO

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def has_ve(layer: int, n_layer: int) -> bool:
    """Value embeddings on alternating layers, the last layer always included (nanochat)."""
    return layer % 2 == (n_layer - 1) % 2


def window_sizes(cfg: GPTConfig) -> list[int]:
    """Left window of each layer in tokens: the pattern tiled over layers, the last layer always full."""
    short = -(-cfg.sequence_len // 4 // 128) * 128  # quarter context, rounded up to a multiple of 128
    sizes = [cfg.sequence_len if c == "L" else short for c in
             (cfg.window_pattern.upper()[i % len(cfg.window_pattern)] for i in range(cfg.n_layer))]
    sizes[-1] = cfg.sequence_len
    return sizes


class Linear(nn.Linear):
    """No bias; the weight is cast to the input's dtype (fp32 master weights, bf16 activations on GPU)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        hd = cfg.head_dim
        self.c_q = Linear(cfg.n_embd, cfg.n_head * hd)
        self.c_k = Linear(cfg.n_embd, cfg.n_kv_head * hd)
        self.c_v = Linear(cfg.n_embd, cfg.n_kv_head * hd)
        self.c_proj = Linear(cfg.n_head * hd, cfg.n_embd)
        self.ve_gate = Linear(12, cfg.n_kv_head) if has_ve(layer, cfg.n_layer) and not cfg.no_ve else None


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp = MLP(cfg)
        if cfg.use_mhc:
            self.hc_attn = HyperConnection(cfg.mhc_num_streams, 2 * layer, cfg.n_embd, cfg.mhc_dynamic)
            self.hc_mlp = HyperConnection(cfg.mhc_num_streams, 2 * layer + 1, cfg.n_embd, cfg.mhc_dynamic)


@dataclass
class Embedded:
    """The token side of a forward: x0 (B, T, D), or (B, S, T, D) with mHC (the streams replicated), the value
    embeddings of every layer (L, B, T, KV*hd) with zeros on layers without them (None with no_ve), the rotary
    tables of the tokens' positions, their first position, and the last token's normed embedding (for the smear of
    the next token when decoding)."""

    x0: torch.Tensor
    ve: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    position: int
    last_embedding: torch.Tensor

    def context(self, layers: slice, past_k=None, past_v=None) -> Context:
        ve = None if self.ve is None else self.ve[layers]
        return Context(self.x0, ve, self.cos, self.sin, self.position, past_k, past_v)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        V, D, L = cfg.padded_vocab_size, cfg.n_embd, cfg.n_layer
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(V, D),
                                          "h": nn.ModuleList([Block(cfg, i) for i in range(L)])})
        self.lm_head = Linear(D, V)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(0.2 * torch.ones(1))
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim) for i in range(L) if has_ve(i, L)})
        if cfg.num_mtp_steps > 0:
            self.mtp_projs = nn.ModuleList([Linear(D, D) for _ in range(cfg.num_mtp_steps)])
        self.windows = window_sizes(cfg)
        self.rotary_len = 10 * cfg.sequence_len  # nanochat precomputes 10x the context
        cos, sin = rotary_tables(self.rotary_len, cfg.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None, output_std: float = 0.0):
        """nanochat's initialization: embedding N(0, 0.8), lm_head N(0, 0.001), q/k/v and value embeddings
        uniform with std 1/sqrt(D), c_fc at 0.4x that, both output projections zero, resid lambdas decaying from
        1.15, x0 lambdas from 0.2, small positive gates.

        output_std > 0 draws the output projections from N(0, output_std) instead: a trained-like model whose
        blocks do something (with zero projections every block is its skip path), for benchmarks and demos."""
        g = None if seed is None else torch.Generator().manual_seed(seed)
        cfg = self.config
        s = 3**0.5 * cfg.n_embd**-0.5

        def uniform(t, lo, hi):
            t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

        self.transformer.wte.weight.copy_(torch.randn(self.transformer.wte.weight.shape, generator=g) * 0.8)
        self.lm_head.weight.copy_(torch.randn(self.lm_head.weight.shape, generator=g) * 0.001)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                uniform(lin.weight, -s, s)
            uniform(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            for proj in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
                proj.copy_(torch.randn(proj.shape, generator=g) * output_std if output_std else torch.zeros_like(proj))
            if block.attn.ve_gate is not None:
                uniform(block.attn.ve_gate.weight, 0.0, 0.02)
        L = cfg.n_layer
        for i in range(L):
            self.resid_lambdas[i] = 1.15 - 0.10 * i / max(L - 1, 1)
            self.x0_lambdas[i] = 0.20 - 0.15 * i / max(L - 1, 1)
        self.smear_lambda.zero_()
        self.backout_lambda.fill_(0.2)
        uniform(self.smear_gate.weight, 0.0, 0.02)
        for ve in self.value_embeds.values():
            uniform(ve.weight, -s, s)
        for proj in getattr(self, "mtp_projs", []):
            uniform(proj.weight, -s, s)

    # -- the pieces of a forward ---------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def check_tokens(self, idx: torch.Tensor, position: int = 0) -> None:
        if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"idx must be an integer tensor of shape (B, T), got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise ValueError(f"idx has token ids in [{int(idx.min())}, {int(idx.max())}], outside the vocabulary "
                             f"[0, {self.config.vocab_size})")
        if position + idx.shape[1] > self.rotary_len:
            raise ValueError(f"sequence of {position + idx.shape[1]} tokens exceeds the rotary cache of "
                             f"{self.rotary_len} tokens (10 x sequence_len={self.config.sequence_len})")

    def embed(self, idx: torch.Tensor, position: int = 0, previous: torch.Tensor | None = None) -> Embedded:
        """Token embedding, norm, smear (the previous token's normed embedding, gated), value embeddings, x0.
        `previous` is the normed embedding of the token before idx[:, 0] when decoding, else None."""
        self.check_tokens(idx, position)
        cfg = self.config
        B, T = idx.shape
        x = norm(self.transformer.wte(idx))  # (B, T, D)
        last = x[:, -1:]
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))
        if previous is None:  # the first token has no predecessor
            x = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        else:
            x = x + gate * torch.cat([previous, x[:, :-1]], dim=1)
        ve = None
        if not cfg.no_ve and self.value_embeds:
            kv_dim = cfg.n_kv_head * cfg.head_dim
            zeros = x.new_zeros(B, T, kv_dim)
            ve = torch.stack([self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else zeros
                              for i in range(cfg.n_layer)])
        if cfg.use_mhc:  # the streams start as copies of the embedding
            x = x.unsqueeze(1).expand(B, cfg.mhc_num_streams, T, cfg.n_embd)
        cos, sin = self.cos[position:position + T], self.sin[position:position + T]
        return Embedded(x, ve, cos, sin, position, last)

    def block_weights(self, layers: slice) -> BlockWeights:
        """The blocks of the slice as stacked weights (views when it holds one layer; differentiable)."""
        cfg = self.config
        idx = range(*layers.indices(cfg.n_layer))
        blocks = [self.transformer.h[i] for i in idx]
        stack = (lambda ts: ts[0].unsqueeze(0)) if len(blocks) == 1 else torch.stack
        gates = [b.attn.ve_gate for b in blocks]
        ve_gate = None
        if any(g is not None for g in gates):
            template = next(g.weight for g in gates if g is not None)
            ve_gate = stack([torch.zeros_like(template) if g is None else g.weight for g in gates])
        windows = torch.tensor([[self.windows[i]] * cfg.n_head for i in idx], device=self.cos.device)

        def hc(name):
            mods = [getattr(b, name) for b in blocks]
            dyn = cfg.mhc_dynamic
            return HCWeights(stack([m.H_res_logits for m in mods]), stack([m.H_pre_logits for m in mods]),
                             stack([m.H_post_logits for m in mods]), cfg.mhc_sinkhorn_iters, cfg.mhc_sinkhorn_tau,
                             stack([m.dyn_proj.weight for m in mods]) if dyn else None,
                             stack([m.dyn_alpha for m in mods]) if dyn else None)

        return BlockWeights(
            c_q=stack([b.attn.c_q.weight for b in blocks]), c_k=stack([b.attn.c_k.weight for b in blocks]),
            c_v=stack([b.attn.c_v.weight for b in blocks]), attn_proj=stack([b.attn.c_proj.weight for b in blocks]),
            c_fc=stack([b.mlp.c_fc.weight for b in blocks]), mlp_proj=stack([b.mlp.c_proj.weight for b in blocks]),
            ve_gate=ve_gate, resid=None if cfg.no_x0_resid else self.resid_lambdas[layers],
            x0=None if cfg.no_x0_resid else self.x0_lambdas[layers], windows=windows, head_dim=cfg.head_dim,
            hc_attn=hc("hc_attn") if cfg.use_mhc else None, hc_mlp=hc("hc_mlp") if cfg.use_mhc else None)

    @property
    def backout_layer(self) -> int:
        """The trace index whose state the backout subtracts: the output of block n_layer // 2."""
        return self.config.n_layer // 2 + 1

    def head(self, last: torch.Tensor, backout: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) in float32 from the last state and the backout state."""
        if self.config.use_mhc:  # (B, S, T, D) -> (B, T, D): the streams are summed
            last, backout = last.sum(dim=1), backout.sum(dim=1)
        x = norm(last - self.backout_lambda.to(last.dtype) * backout)
        logits = at_least_float32(self.lm_head(x)[..., :self.config.vocab_size])
        return SOFTCAP * torch.tanh(logits / SOFTCAP)

    def tail_weights(self, start: int, fuse: int = 1) -> BlockWeights:
        """The blocks from `start` on, stacked, and fused `fuse` at a time."""
        return fuse_weights(self.block_weights(slice(start, None)), fuse)

    def tail_context(self, emb: Embedded, start: int, fuse: int = 1, past=None):
        """A function units -> Context for the units (blocks, or fused chunks of `fuse` blocks) from `start` on.
        `past(units)` gives those units' cached (keys, values) when decoding."""
        ve = None if emb.ve is None else fuse_value_embeddings(emb.ve[start:], fuse)

        def context(units: slice) -> Context:
            past_k, past_v = (None, None) if past is None else past(units)
            return Context(emb.x0, None if ve is None else ve[units], emb.cos, emb.sin, emb.position, past_k, past_v)

        return context

    def layer_system(self, emb: Embedded, start: int = 0, fuse: int = 1, weights: BlockWeights | None = None,
                     past=None) -> ls.LayerSystem:
        """The residual equation of the blocks from `start` on (fused `fuse` at a time), for layersolve. `weights`
        are those blocks' `tail_weights` when the caller has them already; `past` as in `tail_context`.

        Layer l computes exactly what the sequential forward computes at that layer: its window, its x0 / resid
        blend, its value embedding, its hyper-connections. It provides resid_lambdas as `scales` (Scaled) and, for
        mHC, the skip path's mixing resid * H_res_mlp @ H_res_attn on the stream axis (Mixing, SNLP's HCN)."""
        weights = self.tail_weights(start, fuse) if weights is None else weights
        n = weights.num_layers
        ctx = self.tail_context(emb, start, fuse, past)

        def evaluate(layers: slice, inputs: torch.Tensor) -> torch.Tensor:
            return block_forward(weights[layers], inputs, ctx(layers)).out

        mixing = None
        if self.config.use_mhc:
            mixing = (_dynamic_mixing(weights, ctx) if self.config.mhc_dynamic else _static_mixing(weights))
        scales = (weights.resid.detach().to(emb.x0.dtype) if weights.resid is not None  # no blend: skip path is I
                  else torch.ones(n, dtype=emb.x0.dtype, device=emb.x0.device))
        return ls.LayerSystem(evaluate, n, mixing=mixing, stream_dim=1 if self.config.use_mhc else None,
                              scales=scales, state_shape=tuple(emb.x0.shape), dtype=emb.x0.dtype)

    def block(self, i: int, h: torch.Tensor, emb: Embedded) -> torch.Tensor:
        """Block i on its own: f_{i+1}(h) for one state h."""
        return block_forward(self.block_weights(slice(i, i + 1)), h[None], emb.context(slice(i, i + 1))).out[0]

    def trace(self, emb: Embedded, stop: int | None = None) -> list[torch.Tensor]:
        """The sequential trace h_0 .. h_stop (default: all layers), one block after another."""
        trace = [emb.x0]
        for i in range(self.config.n_layer if stop is None else stop):
            trace.append(self.block(i, trace[-1], emb))
        return trace

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """The sequential forward: logits (B, T, vocab_size)."""
        trace = self.trace(self.embed(idx))
        return self.head(trace[-1], trace[self.backout_layer])


def _static_mixing(w: BlockWeights) -> torch.Tensor:
    """(n, S, S): resid_l * H_res_mlp @ H_res_attn, the skip path's exact Jacobian on the stream axis."""
    attn = sinkhorn_log(w.hc_attn.res, w.hc_attn.iters, w.hc_attn.tau)
    mix = sinkhorn_log(w.hc_mlp.res, w.hc_mlp.iters, w.hc_mlp.tau) @ attn
    mix = mix if w.resid is None else w.resid[:, None, None] * mix
    return mix.detach()


def _dynamic_mixing(w: BlockWeights, ctx):
    """Per-token mixing for dynamic mHC, (n, B, T, 1, S, S) against states (B, S, T, D): computed by the block at
    the iterate (the connection matrices are taken as constants, their own derivatives dropped)."""
    def mixing(layers: slice, inputs: torch.Tensor) -> torch.Tensor:
        m = block_forward(w[layers], inputs, ctx(layers), want_mixing=True).mixing  # (n, B, T, S, S)
        return m.detach().unsqueeze(3)
    return mixing
