"""The Transformer block as one function over layer-stacked weights.

`block_forward(w, h, ctx)` applies n blocks to n states at once: every weight in `w` carries a leading layer dim n,
and h is (n, *state). The sequential model calls it with n = 1 (each module's own weights, as views), the
layer-parallel solve with n = the parallel layers (stacked once), and a fused chunk is simply a wider block (more
heads, a wider MLP), so one piece of code defines f_l everywhere, and finite termination checks that they agree.

One block of nanochat (karpathy/nanochat gpt.py), with the SNLP fork's options:
    x   = resid_l * h + x0_l * x0                          (skipped when no_x0_resid)
    x   = x + attn(norm(x), ve)                            attention sublayer
    x   = x + mlp(norm(x))                                 MLP sublayer, ReLU^2
With mHC (hyper-connections) the state has S streams, (B, S, T, D), and each sublayer becomes
    branch = sum_j H_pre[j] x_j;   x_i <- sum_j H_res[i, j] x_j + H_post[i] * sublayer(norm(branch)).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, fields, is_dataclass, replace

import torch
import torch.nn.functional as F

from layersolve.kernels import interpreting

from . import kernels
from .mhc import HCWeights, connection_weights, skip_mixing

Tensor = torch.Tensor
VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels (nanochat)
QK_SCALE = 1.2  # q and k are scaled by 1.2 after their RMS norm (nanochat: "sharper attention")


def norm(x: Tensor) -> Tensor:
    """Parameter-free RMSNorm over the last dim."""
    return F.rms_norm(x, (x.size(-1),))


def at_least_float32(x: Tensor) -> Tensor:
    """bf16 / fp16 activations upcast to float32 for losses and logits; float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def inference_unless_grad():
    """Inference mode where grad is off (under `no_grad`, or in inference mode already), nothing where it is on or
    while torch.compile traces (a compiled forward dispatches no op one by one). A forward that returns ordinary
    tensors runs its layers in it and its last op outside: every op under `no_grad` pays for autograd's version
    counters and view records (1-2% of a prefill on the CPU, measured)."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.inference_mode(not torch.is_grad_enabled())


def linear(x: Tensor, w: Tensor) -> Tensor:
    """Per-layer linear map without bias: x (n, ..., in), w (n, out, in) -> (n, ..., out). Weights are cast to the
    activation dtype, as nanochat's Linear does (fp32 master weights, bf16 matmuls on GPU)."""
    w = w if w.dtype == x.dtype else w.to(x.dtype)
    if w.shape[0] == 1:  # one layer (the sequential model, decoding): a plain matmul, the cheapest dispatch
        return F.linear(x, w[0])
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return torch.bmm(flat, w.transpose(1, 2)).reshape(*x.shape[:-1], w.shape[1])


def rotary_tables(seq_len: int, head_dim: int, base: float = 100000.0, device=None) -> tuple[Tensor, Tensor]:
    """The rotation as `apply_rotary` reads it, (seq_len, head_dim) each, computed in float64 (cast to the activation
    dtype once per forward): cos of each angle on both halves, and sin with the sign of each half's rotation."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat([cos, cos], dim=1), torch.cat([sin, -sin], dim=1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., T, H, hd); cos, sin (T, 1, hd) from `rotary_tables`, broadcast over heads. nanochat rotates the two
    halves by -theta (kept for checkpoint compatibility: only the relative rotation of q and k matters):
    (x1 cos + x2 sin, x2 cos - x1 sin), here as x * cos + (x2, x1) * sin, three elementwise ops instead of six
    (decoding at batch 1 pays per op, not per element); the same numbers, since x1 * -sin = -(x1 * sin)."""
    d = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., d:], x[..., :d]], dim=-1) * sin


# -- weights, stacked over n layers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionWeights:
    """c_q (n, H*hd, D), c_k / c_v (n, KV*hd, D), c_proj (n, D, H*hd); ve_gate (n, KV, 12), or None when the model
    has no value embeddings (zeros for a layer without them); windows (n, H): each head's left window in tokens."""

    c_q: Tensor
    c_k: Tensor
    c_v: Tensor
    c_proj: Tensor
    ve_gate: Tensor | None
    windows: Tensor
    head_dim: int
    c_qkv: Tensor | None = None  # prepared weights only: c_q, c_k, c_v concatenated (n, (H+2KV)*hd, D), one matmul

    @functools.cached_property
    def min_window(self) -> int:
        """The smallest window of any head: when it spans every query-key distance, no window binds. Read once per
        weights object (a host sync on GPU), so prepared weights never sync for it again."""
        return int(self.windows.min())

    @functools.cached_property
    def mask_windows(self) -> Tensor:
        """The windows as the mask needs them: (n, H), or (n, 1) when every head of a layer shares its window (the
        unfused model), so that the mask broadcasts over heads."""
        return self.windows if bool((self.windows != self.windows[:, :1]).any()) else self.windows[:, :1]


@dataclass(frozen=True)
class MLPWeights:
    c_fc: Tensor  # (n, F, D)
    c_proj: Tensor  # (n, D, F)


@dataclass(frozen=True)
class BlockWeights:
    """n blocks' weights. resid, x0 (n,): the blend's lambdas, None when no_x0_resid; hc_attn, hc_mlp: the
    hyper-connections of mHC, else None. A fused chunk of M blocks is one wide block (see fusion.py)."""

    attn: AttentionWeights
    mlp: MLPWeights
    resid: Tensor | None
    x0: Tensor | None
    hc_attn: HCWeights | None = None
    hc_mlp: HCWeights | None = None

    @property
    def num_layers(self) -> int:
        return self.attn.c_q.shape[0]

    def __getitem__(self, layers: slice) -> "BlockWeights":
        """The weights of a sub-range of the stacked layers (views)."""
        return _combine([self], lambda ts: ts[0][layers])


def for_inference(w: BlockWeights, vectors: bool = False) -> BlockWeights:
    """The weights as prepared (inference) weights store them, copied once: c_q, c_k, c_v also concatenated into
    c_qkv, so that one matmul projects all three. With `vectors` (weights for products over a few token rows, such
    as decoding steps), on the CPU every projection is laid out by `long_rows`."""
    a = w.attn
    qkv = torch.cat([a.c_q, a.c_k, a.c_v], dim=1)
    if not (vectors and qkv.device.type == "cpu"):
        return replace(w, attn=replace(a, c_qkv=qkv))
    return replace(w, attn=replace(a, c_qkv=long_rows(qkv), c_proj=long_rows(a.c_proj)),
                   mlp=MLPWeights(long_rows(w.mlp.c_fc), long_rows(w.mlp.c_proj)))


def long_rows(w: Tensor) -> Tensor:
    """A weight (..., out, in) with the same shape and values, stored so that its longer side is contiguous: when
    out > in, input-major (the transpose contiguous), else as it is.

    Why: a decoding step multiplies each weight by a vector, and reads every weight from memory rather than cache
    (a step's weights outgrow the cache). MKL's matrix-vector product streams such a weight several times faster
    along the longer side. Measured on a 2-core EPYC, float32, weights out of cache, out-major -> input-major:
    lm_head 8192 x 128 663 -> 220 us, 8192 x 256 1165 -> 439 us; c_fc 512 x 128 40 -> 28 us, 1024 x 256 146 -> 91 us;
    but c_proj 128 x 512 31 -> 41 us, which stays out-major."""
    if w.shape[-2] <= w.shape[-1]:
        return w
    return w.transpose(-1, -2).contiguous().transpose(-1, -2)


def cat_weights(parts: list):
    """Stacked weights of several layer ranges (BlockWeights, or the weights inside them), one after the other."""
    return parts[0] if len(parts) == 1 else _combine(parts, torch.cat)


def _combine(parts: list, combine):
    """One weights dataclass from parts of one type: combine(the parts' tensors) for every tensor field, nested
    weights likewise; other fields (head_dim, Sinkhorn settings) are the first part's."""
    changes = {}
    for f in fields(parts[0]):
        values = [getattr(p, f.name) for p in parts]
        if isinstance(values[0], Tensor):
            changes[f.name] = combine(values)
        elif is_dataclass(values[0]):
            changes[f.name] = _combine(values, combine)
    return replace(parts[0], **changes)


# -- what the blocks of one forward share --------------------------------------------------------------------------

@dataclass(frozen=True)
class Context:
    """What the n blocks being evaluated share: x0 (B, T, D) or (B, S, T, D) for mHC, their value embeddings
    ve (n, B, T, KV*hd) (or None), rotary tables for the positions of the tokens (Tq, 1, hd), the absolute position
    of the first token (and every token's, as a tensor), and, when decoding, the KV cache of the units being
    evaluated (see `select`)."""

    x0: Tensor
    ve: Tensor | None
    cos: Tensor
    sin: Tensor
    position: int = 0
    positions: Tensor | None = None  # (Tq,) the same positions as a tensor: what a static cache's step reads
    cache: KVCache | None = None
    units: slice | None = None  # the evaluated units' indices in `cache`
    writes: bool = True  # attention writes these tokens' keys and values into the cache (see `select`)
    static_kv: tuple[Tensor, Tensor] | None = None  # a static cache's keys and values of these units (views)

    def select(self, units: slice, cache: KVCache | None = None, writes: bool = True) -> "Context":
        """The context of the units (blocks, or fused chunks) of the slice, attending to their cached keys and
        values of the tokens before `position` when a cache is given. With `writes`, attention stores these tokens'
        keys and values in the cache in place and attends to the cache (no copy of the past); without (functional
        transforms such as JVPs, which cannot mutate a captured tensor), it attends to a concatenation."""
        # a static cache's views are cut here, outside any compiled block: its code then never sees which units
        static_kv = cache.views(units) if cache is not None and cache.static and writes else None
        # the constructor, not dataclasses.replace: this runs for every block at every decoding step, and replace
        # (which walks the fields by name) costs several times more
        return Context(self.x0, None if self.ve is None else self.ve[units], self.cos, self.sin, self.position,
                       self.positions, cache, units, writes, static_kv)

    def keys_values(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values (n, B, KV, T_past + T, hd) that these tokens' queries attend to, given their own k, v
        (n, B, KV, T, hd)."""
        if self.cache is None:
            return k, v
        if self.static_kv is not None:  # write at the tensor of positions, attend to the whole capacity
            keys, values = self.static_kv
            keys.index_copy_(3, self.positions, k)
            values.index_copy_(3, self.positions, v)
            return keys, values
        if self.writes:
            return self.cache.extend(self.units, self.position, k, v)
        past_k, past_v = self.cache.past(self.units, self.position)
        return (k, v) if past_k is None else (torch.cat([past_k, k], dim=3), torch.cat([past_v, v], dim=3))


@dataclass
class KVCache:
    """Keys and values of `units` units for up to `capacity` tokens: (units, B, KV, capacity, hd) each, allocated
    on the first write (when the head counts and dtype are known). Stacked over units, so a batched evaluation of
    the parallel tail reads and writes every unit's cache with one indexing, in place.

    static: every step attends to the whole capacity under a mask, and writes at a tensor of positions, so that
    each step has the same shapes and reads no Python position: a compiled block (GPT.compile_blocks) compiles a
    decoding step once and, on a GPU, replays it as a CUDA graph. A static cache is allocated up front
    (`allocate`), at addresses that stay put."""

    units: int
    capacity: int
    k: Tensor | None = None
    v: Tensor | None = None
    static: bool = False

    def allocate(self, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device) -> None:
        shape = (self.units, batch, heads, self.capacity, head_dim)
        self.k, self.v = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
        if self.static:  # CUDA graphs may mutate only inputs whose address is fixed
            torch._dynamo.mark_static_address(self.k)
            torch._dynamo.mark_static_address(self.v)

    def past(self, units: slice, length: int) -> tuple[Tensor | None, Tensor | None]:
        """The units' keys and values of the first `length` tokens (None, None when there are none)."""
        if self.k is None or length == 0:
            return None, None
        return self.k[units, :, :, :length], self.v[units, :, :, :length]

    def write(self, units: slice, position: int, k: Tensor, v: Tensor) -> None:
        """Store the units' keys and values k, v (n, B, KV, T, hd) of the tokens from `position` on."""
        if self.k is None:
            self.allocate(k.shape[1], k.shape[2], k.shape[4], k.dtype, k.device)
        self.k[units, :, :, position:position + k.shape[3]] = k
        self.v[units, :, :, position:position + v.shape[3]] = v

    def extend(self, units: slice, position: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """`write`, then the units' keys and values of every token up to these (views of the cache)."""
        self.write(units, position, k, v)
        return self.past(units, position + k.shape[3])

    def views(self, units: slice) -> tuple[Tensor, Tensor]:
        """The units' keys and values over the whole capacity (views)."""
        return self.k[units], self.v[units]


# -- the block maths --------------------------------------------------------------------------------------------------

@dataclass
class BlockOutput:
    out: Tensor  # (n, *state)
    k: Tensor  # (n, B, KV, T, hd): this call's keys and values, for a KV cache
    v: Tensor
    mixing: Tensor | None  # mHC: the skip path's mixing resid * H_res_mlp @ H_res_attn, per layer (and token)


def attention_mask(w: AttentionWeights, position: int, queries: int, keys: int, device) -> Tensor | None:
    """Boolean mask (n or 1, 1, H or 1, Tq, Tk) for queries at positions position .. position + queries - 1 over keys
    at 0 .. keys - 1: query i sees key j when 0 <= i - j <= window (nanochat's sliding window; "L" layers have
    window = sequence_len). None when plain attention is exact: no window binds, and either the keys are the
    queries' own (causal) or a single query sees every cached key (decoding)."""
    no_window = w.min_window >= position + queries - 1  # the largest query-key distance
    if no_window and (queries == 1 or keys == queries):
        return None
    q_pos = torch.arange(position, position + queries, device=device)
    if no_window:  # queries after cached keys: causal, offset by the cache
        return (q_pos[:, None] >= torch.arange(keys, device=device)[None, :])[None, None, None]
    return window_mask(w.mask_windows, q_pos, keys)


def window_mask(windows: Tensor, q_pos: Tensor, keys: int) -> Tensor:
    """(n, 1, H or 1, Tq, Tk): query at position q_pos[i] sees key j when 0 <= q_pos[i] - j <= its head's window.
    windows (n, H or 1); q_pos (Tq,) a tensor, so a static cache's step computes it without reading a position."""
    distance = q_pos[:, None] - torch.arange(keys, device=q_pos.device)[None, :]  # (Tq, Tk)
    return (distance >= 0) & (distance <= windows[:, None, :, None, None])


def project_qkv(w: AttentionWeights, x: Tensor, ctx: Context,
                queries: bool = True) -> tuple[Tensor | None, Tensor, Tensor]:
    """Queries, keys, values (n, B, heads, T, hd) of the normed sublayer input x (n, B, T, D): value embeddings
    gated in, rotary, QK norm. Without `queries`, only the keys and values (the queries are None)."""
    n, B, T, D = x.shape
    hd = w.head_dim
    KV = w.c_k.shape[1] // hd
    H = w.c_q.shape[1] // hd if queries else 0  # query heads computed
    # q and k heads side by side (n, B, T, H + KV, hd): rotary and QK norm act per head, so one call does both
    if w.c_qkv is not None:
        qkv = linear(x, w.c_qkv if queries else w.c_qkv[:, w.c_q.shape[1]:]).view(n, B, T, H + 2 * KV, hd)
        qk, v = qkv[:, :, :, :H + KV], qkv[:, :, :, H + KV:]
    else:
        k = linear(x, w.c_k).view(n, B, T, KV, hd)
        qk = torch.cat([linear(x, w.c_q).view(n, B, T, H, hd), k], dim=3) if queries else k
        v = linear(x, w.c_v).view(n, B, T, KV, hd)
    if ctx.ve is not None and w.ve_gate is not None:  # value residual with an input-dependent gate per kv head
        gate = 3 * torch.sigmoid(linear(x[..., :VE_GATE_CHANNELS], w.ve_gate))  # (n, B, T, KV), in (0, 3)
        v = v + gate.unsqueeze(-1) * ctx.ve.view(n, B, T, KV, hd)
    qk = norm(apply_rotary(qk, ctx.cos, ctx.sin)) * QK_SCALE
    q = qk[:, :, :, :H].transpose(2, 3) if queries else None
    return q, qk[:, :, :, H:].transpose(2, 3), v.transpose(2, 3)


def attention(w: AttentionWeights, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
    """Causal self-attention of n blocks over the cached keys and these tokens' own. x (n, B, T, D) is the normed
    sublayer input. Returns (y, k, v), k and v for these tokens only."""
    n, B, T, D = x.shape
    q, k, v = project_qkv(w, x, ctx)
    keys, values = ctx.keys_values(k, v)
    if ctx.static_kv is not None:  # the whole capacity: always masked
        mask = window_mask(w.windows, ctx.positions, keys.shape[3])
    else:
        mask = attention_mask(w, ctx.position, T, keys.shape[3], x.device)
    causal = mask is None and T > 1
    if mask is not None:  # (n, 1, H or 1, Tq, Tk) -> (n * B, H or 1, Tq, Tk)
        mask = mask.expand(n, B, *mask.shape[2:]).flatten(0, 1)
    # SDPA over (n * B) batches: a 4-D call takes the fused CPU / GPU kernels; 5-D inputs fall back to the
    # unfused maths (3.4x slower for 12 x 512 tokens on the CPU).
    y = F.scaled_dot_product_attention(q.flatten(0, 1), keys.flatten(0, 1), values.flatten(0, 1), attn_mask=mask,
                                       is_causal=causal, enable_gqa=True)
    y = y.unflatten(0, (n, B)).transpose(2, 3).reshape(n, B, T, -1)
    return linear(y, w.c_proj), k, v


def mlp(w: MLPWeights, x: Tensor) -> Tensor:
    """x (n, B, T, D) normed -> (n, B, T, D): relu squared. Without autograd the square is taken in place on the
    relu's fresh output, one (n, B, T, F) tensor fewer (about 1% of a prefill on the CPU)."""
    h = F.relu(linear(x, w.c_fc))
    return linear(h.square() if torch.is_grad_enabled() else h.square_(), w.c_proj)


def block_forward(w: BlockWeights, h: Tensor, ctx: Context, want_mixing: bool = False) -> BlockOutput:
    """n blocks on n states: h (n, B, T, D), or (n, B, S, T, D) with mHC. Returns the blocks' outputs."""
    x, branch, hc = _attention_input(w, h, ctx)
    y, k, v = attention(w.attn, branch, ctx)
    if hc is None:
        x = x + y
        return BlockOutput(x + mlp(w.mlp, norm(x)), k, v, None)
    _, res, post = hc
    x = _mix(res, x) + _spread(post, y)
    pre2, res2, post2 = connection_weights(w.hc_mlp, x)
    out = _mix(res2, x) + _spread(post2, mlp(w.mlp, norm(_pool(pre2, x))))
    return BlockOutput(out, k, v, skip_mixing(res, res2, w.resid) if want_mixing else None)


def run_block(w: BlockWeights, unit: int, h: Tensor, ctx: Context, cache: KVCache | None = None,
              forward=block_forward) -> Tensor:
    """One block, of index `unit` in ctx and the cache (its index in the model when they cover every layer), with
    its weights w (a stack of one) on h (B, T, D), or (B, S, T, D) with mHC. With a KV cache (decoding), the block
    attends to its cached keys and values of earlier tokens and stores these tokens' own. `forward`: block_forward,
    or a compiled version of it (GPT.compile_blocks)."""
    return forward(w, h[None], ctx.select(slice(unit, unit + 1), cache)).out[0]  # n = 1


def block_kv(w: BlockWeights, h: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
    """The keys and values n blocks compute from inputs h, without the rest of the block: what a KV cache stores
    for the final iterate of a layer-parallel solve."""
    _, branch, _ = _attention_input(w, h, ctx)
    _, k, v = project_qkv(w.attn, branch, ctx, queries=False)
    return k, v


def _attention_input(w: BlockWeights, h: Tensor, ctx: Context):
    """The part of a block its keys and values depend on: the blended state x (n, *state), the attention branch's
    normed input (n, B, T, D), and with mHC the attention sublayer's (H_pre, H_res, H_post) (else None).
    The x0 / residual blend belongs to the layer: f_l(h) = block_l(resid_l h + x0_l x0)."""
    # the blend and the norm in one Triton pass (kernels.py) where a kernel can run; torch.compile fuses its own
    if w.hc_attn is None and not torch.compiler.is_compiling() and (h.is_cuda or interpreting()):
        x, normed = kernels.blend_norm(h, *((None, None, None) if w.resid is None else (ctx.x0, w.resid, w.x0)))
        return x, normed, None
    x = h if w.resid is None else kernels.blend(h, ctx.x0, w.resid, w.x0)
    if w.hc_attn is None:
        return x, norm(x), None
    hc = connection_weights(w.hc_attn, x)
    return x, norm(_pool(hc[0], x)), hc


def _pool(pre: Tensor, x: Tensor) -> Tensor:
    """Branch input sum_j H_pre[j] x_j. pre (n, S) or per token (n, B, T, S); x (n, B, S, T, D) -> (n, B, T, D)."""
    if pre.ndim == 2:
        return torch.einsum("ns,nbstd->nbtd", pre.to(x.dtype), x)
    return torch.einsum("nbts,nbstd->nbtd", pre.to(x.dtype), x)


def _mix(res: Tensor, x: Tensor) -> Tensor:
    """Stream mixing sum_j H_res[i, j] x_j. res (n, S, S) or per token (n, B, T, S, S)."""
    if res.ndim == 3:
        return torch.einsum("nij,nbjtd->nbitd", res.to(x.dtype), x)
    return torch.einsum("nbtij,nbjtd->nbitd", res.to(x.dtype), x)


def _spread(post: Tensor, y: Tensor) -> Tensor:
    """Branch output to the streams, H_post[i] * y. post (n, S) or (n, B, T, S); y (n, B, T, D)."""
    if post.ndim == 2:
        return post.to(y.dtype)[:, None, :, None, None] * y[:, :, None]
    return post.to(y.dtype).permute(0, 1, 3, 2)[..., None] * y[:, :, None]
