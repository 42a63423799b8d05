"""nanochat's GPT (karpathy/nanochat gpt.py) with the SNLP fork's options (no_x0_resid, no_ve, mHC), as plain modules
whose parameter names are nanochat's state_dict keys.

A forward reads in three parts: the embedding side (token embedding, norm, smear, value embeddings: x0), the blocks
(h_l = f_l(h_{l-1}), l = 1..L), and the head side (backout of the mid-depth state, final norm, softcapped logits).
Each module's forward runs the block maths of block.py over its own weights (a stack of one layer): the same
function the layer-parallel solve runs over many layers at once (system.py), so there is one definition of f_l.

Features: rotary embeddings (base 100000), QK norm scaled by 1.2, ReLU^2 MLP, parameter-free RMSNorm (also right
after the embedding), untied embedding / lm_head, no biases, GQA, sliding windows tiled over layers (last layer
full), resid / x0 lambdas, gated value embeddings on alternating layers, a previous-token smear, a backout of the
mid-depth state, a vocabulary padded to a multiple of 64, logit softcap 15.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .block import (VE_GATE_CHANNELS, AttentionWeights, BlockWeights, Context, KVCache, MLPWeights, at_least_float32,
                    attention, block_forward, cat_weights, for_inference, inference_unless_grad, long_rows, mlp, norm,
                    rotary_tables, run_block)
from .config import GPTConfig, has_ve, window_sizes
from .fusion import fuse_value_embeddings, fuse_weights
from .mhc import HyperConnection
from .prepared import Prepared
from .system import BlockSystem

SOFTCAP = 15.0
SMEAR_CHANNELS = 24  # the smear gate reads the first 24 channels of the embedding
RECOMPILE_LIMIT = 64  # compiled variants of a function kept per process (keep_compiled_variants)
# A product over at most this many token rows per layer (a decoding step, a speculative draft's verification, a
# short prompt) reads each weight from memory for a few vectors, and on the CPU runs faster on weights laid out by
# `long_rows`: 1.03-2.8x at 1 to 32 rows, out of cache, on the 2-core EPYC. Wider products (prefill) keep the
# parameters' layout: there the two layouts run at the same speed, except where MKL picks a slow kernel for one of
# them (a fused chunk's QKV, 3 x 768 x 128 over 256 rows: 1.2 ms as the parameters lie, 4.0 ms input-major).
VECTOR_ROWS = 32


def few_rows(x: torch.Tensor) -> bool:
    """Whether a product over the token rows of x (..., D) multiplies its weights as a few vectors (VECTOR_ROWS)."""
    return x.numel() <= VECTOR_ROWS * x.shape[-1]


class Linear(nn.Linear):
    """No bias; the weight is cast to the input's dtype (fp32 master weights, bf16 activations on GPU)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__(d_in, d_out, bias=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype))


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer, self.n_head, self.n_kv_head, self.head_dim = layer, cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.window = window_sizes(cfg)[layer]  # left window in tokens
        self.c_q = Linear(cfg.n_embd, cfg.n_head * cfg.head_dim)
        self.c_k = Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim)
        self.c_v = Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim)
        self.c_proj = Linear(cfg.n_head * cfg.head_dim, cfg.n_embd)
        self.uses_ve = not cfg.no_ve
        self.ve_gate = Linear(VE_GATE_CHANNELS, cfg.n_kv_head) if has_ve(layer, cfg.n_layer) and self.uses_ve else None

    def weights(self) -> AttentionWeights:
        """This layer's weights as a stack of one (views). A layer without value embeddings in a model with them gets
        a zero gate (its value embedding is zero too), so that layers stack."""
        gate = None if self.ve_gate is None else self.ve_gate.weight[None]
        if gate is None and self.uses_ve:
            gate = self.c_v.weight.new_zeros(1, self.n_kv_head, VE_GATE_CHANNELS)
        windows = torch.full((1, self.n_head), self.window, device=self.c_q.weight.device)
        return AttentionWeights(self.c_q.weight[None], self.c_k.weight[None], self.c_v.weight[None],
                                self.c_proj.weight[None], gate, windows, self.head_dim)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        """The attention branch of the normed sublayer input x (B, T, D) -> (B, T, D); ctx covers every layer."""
        y, _, _ = attention(self.weights(), x[None], ctx.select(slice(self.layer, self.layer + 1)))
        return y[0]


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd)

    def weights(self) -> MLPWeights:
        return MLPWeights(self.c_fc.weight[None], self.c_proj.weight[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP branch of the normed sublayer input x (B, T, D) -> (B, T, D): ReLU^2."""
        return mlp(self.weights(), x[None])[0]


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn = CausalSelfAttention(cfg, layer)
        self.mlp = MLP(cfg)
        if cfg.use_mhc:  # as in the SNLP fork, the modules exist only with mHC
            self.hc_attn = HyperConnection(cfg, 2 * layer)
            self.hc_mlp = HyperConnection(cfg, 2 * layer + 1)

    def weights(self, resid: torch.Tensor | None, x0: torch.Tensor | None) -> BlockWeights:
        """This block's weights as a stack of one (views), with its blend lambdas resid, x0 (1,) (None without)."""
        hc = hasattr(self, "hc_attn")
        return BlockWeights(self.attn.weights(), self.mlp.weights(), resid, x0,
                            self.hc_attn.weights() if hc else None, self.hc_mlp.weights() if hc else None)

    def forward(self, h: torch.Tensor, ctx: Context, resid: torch.Tensor | None, x0: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        """f_l(h) = block_l(resid_l h + x0_l x0) for this layer l: h (B, T, D), or (B, S, T, D) with mHC, to the
        same shape. ctx covers every layer. With a KV cache (decoding), the block attends to its cached keys and
        values of earlier tokens and stores these tokens' own."""
        return run_block(self.weights(resid, x0), self.layer, h, ctx, cache)


@dataclass(frozen=True)
class Embedded:
    """The token side of a forward: x0 (B, T, D), or (B, S, T, D) with mHC (the streams replicated), the value
    embeddings of every layer (L, B, T, KV*hd) with zeros on layers without them (None with no_ve; a stage of a
    split model holds only its own layers', indexed from its first), the rotary tables of the tokens' positions,
    their first position and every position (T,) as a tensor (what a static KV cache's step reads), and the last
    token's normed embedding (for the smear of the next token when decoding; None where the embedding is not
    computed)."""

    x0: torch.Tensor
    ve: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    position: int
    positions: torch.Tensor
    last_embedding: torch.Tensor | None

    def context(self, start: int = 0, fuse: int = 1, stop: int | None = None) -> Context:
        """What the units of layers start .. stop - 1 share, `fuse` blocks to a unit: their value embeddings cut and
        fused (fusion.py). The default is every block of the model."""
        ve = None if self.ve is None else fuse_value_embeddings(self.ve[start:stop], fuse)
        return Context(self.x0, ve, self.cos, self.sin, self.position, self.positions)


def keep_compiled_variants() -> None:
    """Let dynamo keep RECOMPILE_LIMIT compiled variants of each function in this process. It keeps 8 by default,
    then silently runs the function eagerly: a process that compiles several models (a bench: one per shape, mHC,
    trained models) or many shapes passes 8 quickly, and its later compiled rows would time eager code."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)


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
        self.rotary_len = 10 * cfg.sequence_len  # nanochat precomputes 10x the context
        cos, sin = rotary_tables(self.rotary_len, cfg.head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.prepared = Prepared()  # stacked weights and window bounds, reused while the weights stay the same
        self.block_forward = block_forward  # what evaluates blocks; compile_blocks replaces it
        self.init_weights()

    def compile_blocks(self, mode: str | None = None) -> "GPT":
        """Evaluate the blocks of forwards without a KV cache through `torch.compile(block_forward)`: the sequential
        forward, and the sequential prefix and layer-parallel tail of `snlp.forward` (JVPs stay eager); and the
        head. The embedding and the solver's correction stay eager, so the solver's checks and statistics work
        unchanged. Each new shape (tokens, units per call) compiles once, on its first call. mode="reduce-overhead"
        replays CUDA graphs on a GPU; on the CPU it adds nothing. Decoding runs compiled with a static cache
        (`Decoder(..., static=True)`), whose steps all have one shape; with the default dynamic cache every step's
        cache length would be a new shape, so it stays eager. Returns the model."""
        keep_compiled_variants()  # the sequential block, the tail's unit counts (and CPU groups), fused chunks,
        # prompt and step shapes
        self.block_forward = torch.compile(block_forward, mode=mode, dynamic=False)
        # the head too: its softcap over the vocabulary (three passes over B x T x V eagerly) is a fifth to a half
        # of an eager prefill at these widths
        self.head = torch.compile(GPT.head.__get__(self), mode=mode, dynamic=False)  # the class's, not an earlier compile
        return self

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

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """The sequential forward: logits (B, T, vocab_size)."""
        with inference_unless_grad():  # the head, outside, returns ordinary tensors
            emb = self.embed(idx)  # x0 (B, T, D), or (B, S, T, D) with mHC
            trace = self.trace(emb)  # h_0 .. h_L
        return self.head(trace[-1], trace[self.backout_layer])

    # -- the embedding side: tokens -> x0 -------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.wte.weight.dtype

    def check_tokens(self, idx: torch.Tensor, position: int = 0) -> None:
        if not isinstance(idx, torch.Tensor) or idx.ndim != 2 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"idx must be an integer tensor of shape (B, T), got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} {tuple(getattr(idx, 'shape', ()))}")
        if idx.numel():
            low, high = (int(t) for t in torch.aminmax(idx))  # one pass; read at every decoding step
            if low < 0 or high >= self.config.vocab_size:
                raise ValueError(f"idx has token ids in [{low}, {high}], outside the vocabulary "
                                 f"[0, {self.config.vocab_size})")
        if position + idx.shape[1] > self.rotary_len:
            raise ValueError(f"sequence of {position + idx.shape[1]} tokens exceeds the rotary cache of "
                             f"{self.rotary_len} tokens (10 x sequence_len={self.config.sequence_len})")

    def embed(self, idx: torch.Tensor, position: int = 0, previous: torch.Tensor | None = None,
              layers: range | None = None) -> Embedded:
        """Token embedding, norm, smear (the previous token's normed embedding, gated), value embeddings, x0.
        `previous` is the normed embedding of the token before idx[:, 0] when decoding, else None. `layers`: the
        layers whose value embeddings to compute (default all; a stage of a split model holds only its own)."""
        if not torch.compiler.is_compiling():  # the checks read values on the host: a graph break under compile
            self.check_tokens(idx, position)
            self.prepared.refresh(self._parameter_list())
        cfg = self.config
        B, T = idx.shape
        x = norm(self.transformer.wte(idx))  # (B, T, D)
        last = x[:, -1:]
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))  # (B, T, 1)
        if previous is None:  # the first token has no predecessor
            x = torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        else:
            x = x + gate * torch.cat([previous, x[:, :-1]], dim=1)
        if cfg.use_mhc:  # the streams start as copies of the embedding
            x = x.unsqueeze(1).expand(B, cfg.mhc_num_streams, T, cfg.n_embd)  # (B, S, T, D)
        return self.embedded(x, idx, position, range(cfg.n_layer) if layers is None else layers, last)

    def embedded(self, x0: torch.Tensor, idx: torch.Tensor, position: int, layers: range,
                 last: torch.Tensor | None = None) -> Embedded:
        """The Embedded of x0 for the tokens idx (B, T) at `position`: the value embeddings of `layers` (zeros on
        layers without them) and the rotary tables. A stage of a split model builds it from the x0 it receives."""
        cfg = self.config
        ve = None
        if not cfg.no_ve and self.value_embeds:
            zeros = x0.new_zeros(*idx.shape, cfg.n_kv_head * cfg.head_dim)
            ve = torch.stack([self.value_embeds[str(i)](idx).to(x0.dtype) if str(i) in self.value_embeds else zeros
                              for i in layers])  # (len(layers), B, T, KV*hd)
        # the rotary tables are float64; cut (T, 1, hd) to broadcast over heads and cast once here rather than in
        # every block's apply_rotary
        T = idx.shape[1]
        cos = self.cos[position:position + T, None].to(x0.dtype)
        sin = self.sin[position:position + T, None].to(x0.dtype)
        # the positions as a tensor here, not cached on first use: Python 3.11's functools.cached_property takes a
        # lock, which torch.compile cannot trace (a graph break in every compiled forward)
        positions = torch.arange(position, position + T, device=x0.device)
        return Embedded(x0, ve, cos, sin, position, positions, last)

    # -- the blocks: h_l = f_l(h_{l-1}) ---------------------------------------------------------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        """The blocks as modules, block l = f_(l+1): what a segment's training touches."""
        return self.transformer.h

    def _parameter_list(self) -> tuple[torch.Tensor, ...]:
        """The parameters, listed once: walking the module tree at every decoding step costs more than a layer."""
        if getattr(self, "_parameters_listed", None) is None:
            self._parameters_listed = tuple(self.parameters())
        return self._parameters_listed

    def lambdas(self, layers: slice) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The blend's resid and x0 lambdas of the layers of the slice, (None, None) with no_x0_resid."""
        if self.config.no_x0_resid:
            return None, None
        return self.resid_lambdas[layers], self.x0_lambdas[layers]

    def block(self, i: int, h: torch.Tensor, emb: Embedded, cache: KVCache | None = None,
              ctx: Context | None = None, unit: int | None = None, weights: BlockWeights | None = None) -> torch.Tensor:
        """f_{i+1}(h): block i on the state h (B, T, D), or (B, S, T, D) with mHC; `cache` as in `trace`; `ctx`:
        `emb.context()` when the caller has it already. `unit`: the block's index in ctx and the cache when they
        cover only some layers (a stage of a split model), default i. `weights`: block i's, when the caller holds
        them as views of a larger stack. The same maths as the module's forward, with prepared weights."""
        weights = self.block_weights(slice(i, i + 1), few_rows(h)) if weights is None else weights
        return run_block(weights, i if unit is None else unit, h, emb.context() if ctx is None else ctx, cache,
                         self._forward_with(cache))

    def trace(self, emb: Embedded, stop: int | None = None, cache: KVCache | None = None, start: int = 0,
              state: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The sequential trace h_start .. h_stop (default h_0 .. h_L), blocks start .. stop - 1 one after another
        from `state` = h_start (default h_0 = emb.x0). With a KV cache of those blocks (decoding; unit i is block
        start + i), each block attends to its cached keys and values and stores these tokens' own."""
        ctx, trace = emb.context(start), [emb.x0 if state is None else state]  # ctx unit i: block start + i
        for i in range(start, self.config.n_layer if stop is None else stop):
            trace.append(self.block(i, trace[-1], emb, cache, ctx, unit=i - start))
        return trace

    def block_weights(self, layers: slice, vectors: bool = False) -> BlockWeights:
        """The blocks of the slice as stacked weights (views when it holds one block; differentiable with grad
        enabled, else prepared once: see prepared.py), for products over a few token rows with `vectors`."""
        first, stop, _ = layers.indices(self.config.n_layer)
        return self.prepared.get(("blocks", first, stop, vectors),
                                 lambda: self._prepare(self._stacked(first, stop), vectors))

    def _stacked(self, first: int, stop: int) -> BlockWeights:
        return cat_weights([self.transformer.h[i].weights(*self.lambdas(slice(i, i + 1))) for i in range(first, stop)])

    # -- the head side: h_L -> logits -------------------------------------------------------------------------------

    @property
    def backout_layer(self) -> int:
        """The trace index whose state the backout subtracts: the output of block n_layer // 2."""
        return self.config.n_layer // 2 + 1

    def head(self, last: torch.Tensor, backout: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) in float32 from the last state and the backout state."""
        if self.config.use_mhc:  # (B, S, T, D) -> (B, T, D): the streams are summed
            last, backout = last.sum(dim=1), backout.sum(dim=1)
        x = norm(last - self.backout_lambda.to(last.dtype) * backout)
        if torch.is_grad_enabled():
            return SOFTCAP * torch.tanh(at_least_float32(self.lm_head(x)[..., :self.config.vocab_size]) / SOFTCAP)
        # inference: c tanh(z / c) = 2c (sigmoid(2z / c) - 1/2), with c = SOFTCAP. The scaling 2 / c goes on the
        # D-wide state, before the head, and the rest runs in place: one tensor of B x T x V instead of three. On the
        # CPU, torch's sigmoid runs 5x faster than its tanh (4M logits: 1.3 ms against 7 ms on the 2-core EPYC), and
        # the softcap took a fifth of an L12 D128 prefill; in float32 the identity lands within 3.5e-6 of the exact
        # value (4M logits; tanh's own form: 1.3e-6), a few ulps of c.
        w = self._head_weight(few_rows(x)).to(x.dtype)
        logits = at_least_float32(F.linear(x * (2 / SOFTCAP), w)[..., :self.config.vocab_size])
        return logits.sigmoid_().sub_(0.5).mul_(2 * SOFTCAP)

    def _head_weight(self, vectors: bool) -> torch.Tensor:
        """The lm_head's weight for inference; for a few token rows (`vectors`) on the CPU laid out by `long_rows`,
        prepared once: a decoding step's head reads it 3x faster, a tenth of a step at L12 D128. A compiled head
        reads the parameter: inductor plans its own layouts."""
        w = self.lm_head.weight
        if not vectors or w.device.type != "cpu" or torch.compiler.is_compiling():
            return w
        return self.prepared.get(("lm_head",), lambda: long_rows(w))

    # -- the layer-parallel view (system.py) -------------------------------------------------------------------------

    def segment_weights(self, start: int, fuse: int = 1, stop: int | None = None,
                        vectors: bool = False) -> BlockWeights:
        """The blocks start .. stop - 1 (default: to the last), stacked, and fused `fuse` at a time; for products
        over a few token rows with `vectors`."""
        stop = self.config.n_layer if stop is None else stop
        return self.prepared.get(("segment", start, stop, fuse, vectors),
                                 lambda: self._prepare(fuse_weights(self._stacked(start, stop), fuse), vectors))

    @staticmethod
    def _prepare(w: BlockWeights, vectors: bool) -> BlockWeights:
        """Weights to be stored for inference get their one-matmul QKV and their layout (`for_inference`); with
        grad enabled (nothing is stored) these copies would be made at every forward, so training uses the
        parameters as they are."""
        return w if torch.is_grad_enabled() else for_inference(w, vectors)

    def layer_system(self, emb: Embedded, start: int = 0, fuse: int = 1, weights: BlockWeights | None = None,
                     past: KVCache | None = None, stop: int | None = None) -> BlockSystem:
        """The residual equation of the blocks start .. stop - 1 (default: to the last), fused `fuse` at a time,
        for layersolve. `weights`: those units' `segment_weights` when the caller has them already; `past`: their
        KV cache when decoding."""
        weights = self.segment_weights(start, fuse, stop, few_rows(emb.x0)) if weights is None else weights
        return BlockSystem(weights, emb.context(start, fuse, stop), past, self._forward_with(past))

    def _forward_with(self, cache: KVCache | None):
        """The block function for forwards with this cache: compile_blocks' unless a dynamic cache would give it a
        new shape at every decoding step."""
        return self.block_forward if cache is None or cache.static else block_forward
