"""The Transformer block as one function over layer-stacked weights.

`block_forward(w, x, ctx)` applies n blocks to n states at once: every weight in `w` carries a leading layer dim n,
and x is (n, *state). The sequential model calls it with n = 1 (views of one block's weights), the layer-parallel
solve with n = the parallel layers (stacked once), and a fused chunk is simply a wider block (more heads, a wider
MLP), so one piece of code defines f_l everywhere, and finite termination checks that they agree.

One block of nanochat (karpathy/nanochat gpt.py), with the SNLP fork's options:
    x   = resid_l * h + x0_l * x0                          (skipped when no_x0_resid)
    x   = x + attn(norm(x), ve)                            attention sublayer
    x   = x + mlp(norm(x))                                 MLP sublayer, ReLU^2
With mHC (hyper-connections) the state has S streams, (B, S, T, D), and each sublayer becomes
    branch = sum_j H_pre[j] x_j;   x_i <- sum_j H_res[i, j] x_j + H_post[i] * sublayer(norm(branch)).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass, replace

import torch
import torch.nn.functional as F

from .mhc import HCWeights, connection_weights

Tensor = torch.Tensor
VE_GATE_CHANNELS = 12  # the value-embedding gate reads the first 12 channels (nanochat)
QK_SCALE = 1.2  # q and k are scaled by 1.2 after their RMS norm (nanochat: "sharper attention")


def norm(x: Tensor) -> Tensor:
    """Parameter-free RMSNorm over the last dim."""
    return F.rms_norm(x, (x.size(-1),))


def at_least_float32(x: Tensor) -> Tensor:
    """bf16 / fp16 activations upcast to float32 for losses and logits; float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def linear(x: Tensor, w: Tensor) -> Tensor:
    """Per-layer linear map without bias: x (n, ..., in), w (n, out, in) -> (n, ..., out). Weights are cast to the
    activation dtype, as nanochat's Linear does (fp32 master weights, bf16 matmuls on GPU)."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    return (flat @ w.transpose(1, 2).to(x.dtype)).reshape(*x.shape[:-1], w.shape[1])


def rotary_tables(seq_len: int, head_dim: int, base: float = 100000.0, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (seq_len, head_dim / 2), computed in float64 (cast to the activation dtype at use)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)
    return freqs.cos(), freqs.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (..., T, H, hd); cos, sin (T, hd/2). nanochat rotates the two halves by -theta (kept for checkpoint
    compatibility: only the relative rotation of q and k matters)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)  # (T, 1, hd/2): broadcast over heads
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


@dataclass(frozen=True)
class BlockWeights:
    """n blocks' weights, stacked on dim 0. A fused chunk of M blocks is one wide block: its heads, windows and
    value-embedding gates are the M blocks' concatenated, its output projections and MLP widths concatenated (so
    their outputs are summed), its lambdas averaged.

    c_q (n, H*hd, D), c_k / c_v (n, KV*hd, D), attn_proj (n, D, H*hd), c_fc (n, F, D), mlp_proj (n, D, F);
    ve_gate (n, KV, 12) or None when no layer uses value embeddings (zeros for a layer without them);
    resid, x0 (n,) or None when no_x0_resid; windows (n, H): each head's left window in tokens;
    hc_attn, hc_mlp: hyper-connection weights for mHC, else None.
    """

    c_q: Tensor
    c_k: Tensor
    c_v: Tensor
    attn_proj: Tensor
    c_fc: Tensor
    mlp_proj: Tensor
    ve_gate: Tensor | None
    resid: Tensor | None
    x0: Tensor | None
    windows: Tensor
    head_dim: int
    hc_attn: HCWeights | None = None
    hc_mlp: HCWeights | None = None

    @property
    def num_layers(self) -> int:
        return self.c_q.shape[0]

    def __getitem__(self, layers: slice) -> "BlockWeights":
        """The weights of a sub-range of the stacked layers (views)."""
        def cut(t):
            return None if t is None else t[layers]
        return replace(self, c_q=self.c_q[layers], c_k=self.c_k[layers], c_v=self.c_v[layers],
                       attn_proj=self.attn_proj[layers], c_fc=self.c_fc[layers], mlp_proj=self.mlp_proj[layers],
                       ve_gate=cut(self.ve_gate), resid=cut(self.resid), x0=cut(self.x0), windows=self.windows[layers],
                       hc_attn=None if self.hc_attn is None else self.hc_attn[layers],
                       hc_mlp=None if self.hc_mlp is None else self.hc_mlp[layers])


def cat_weights(parts: list):
    """Stacked weights of several layer ranges (BlockWeights, or HCWeights inside them), one after the other."""
    first = parts[0]
    changes = {}
    for f in fields(first):
        value = getattr(first, f.name)
        if isinstance(value, Tensor):
            changes[f.name] = torch.cat([getattr(p, f.name) for p in parts])
        elif is_dataclass(value):
            changes[f.name] = cat_weights([getattr(p, f.name) for p in parts])
    return replace(first, **changes)


@dataclass
class Context:
    """What every block of one forward shares: x0 (B, T, D) or (B, S, T, D) for mHC, the value embeddings
    ve (n, B, T, KV*hd) of the blocks being evaluated (or None), rotary tables for the positions of the tokens
    (Tq, hd/2), the absolute position of the first token, and the cached keys / values of earlier tokens."""

    x0: Tensor
    ve: Tensor | None
    cos: Tensor
    sin: Tensor
    position: int = 0
    past_k: Tensor | None = None  # (n, B, KV, T_past, hd)
    past_v: Tensor | None = None


@dataclass
class BlockOutput:
    out: Tensor  # (n, *state)
    k: Tensor  # (n, B, KV, T, hd): this call's keys and values, for a KV cache
    v: Tensor
    mixing: Tensor | None  # mHC: the skip path's mixing resid * H_res_mlp @ H_res_attn, per layer (and token)


def attention_mask(windows: Tensor, q_pos: Tensor, k_pos: Tensor) -> Tensor | None:
    """Boolean mask (n, 1, H or 1, Tq, Tk): query i sees key j when 0 <= i - j <= window (nanochat's sliding
    window; "L" layers have window = sequence_len). None when no window binds and plain causal attention is exact."""
    distance = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk)
    if bool((windows >= distance.max()).all()):
        return None
    w = windows if bool((windows != windows[:, :1]).any()) else windows[:, :1]  # one window per layer unless fused
    return (distance >= 0) & (distance <= w[:, None, :, None, None])


def project_qkv(w: BlockWeights, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys, values (n, B, heads, T, hd) of the normed sublayer input x (n, B, T, D): value embeddings
    gated in, rotary, QK norm."""
    n, B, T, D = x.shape
    hd = w.head_dim
    q = linear(x, w.c_q).view(n, B, T, -1, hd)
    k = linear(x, w.c_k).view(n, B, T, -1, hd)
    v = linear(x, w.c_v).view(n, B, T, -1, hd)
    if ctx.ve is not None and w.ve_gate is not None:  # value residual with an input-dependent gate per kv head
        gate = 3 * torch.sigmoid(linear(x[..., :VE_GATE_CHANNELS], w.ve_gate))  # (n, B, T, KV), in (0, 3)
        v = v + gate.unsqueeze(-1) * ctx.ve.view(n, B, T, -1, hd)
    q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
    q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
    return tuple(t.transpose(2, 3) for t in (q, k, v))


def attention(w: BlockWeights, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor, Tensor]:
    """Causal self-attention of n blocks over the cached keys and these tokens' own. x (n, B, T, D) is the normed
    sublayer input. Returns (y, k, v), k and v for these tokens only."""
    n, B, T, D = x.shape
    q, k, v = project_qkv(w, x, ctx)
    keys = k if ctx.past_k is None else torch.cat([ctx.past_k, k], dim=3)
    values = v if ctx.past_v is None else torch.cat([ctx.past_v, v], dim=3)
    q_pos = torch.arange(ctx.position, ctx.position + T, device=x.device)
    k_pos = torch.arange(keys.shape[3], device=x.device)
    mask = attention_mask(w.windows, q_pos, k_pos)
    causal = mask is None and ctx.past_k is None and T > 1
    if mask is None and not causal and T > 1:  # queries after cached keys: causal offset by the cache
        mask = (q_pos[:, None] >= k_pos[None, :])
    y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=causal, enable_gqa=True)
    y = y.transpose(2, 3).reshape(n, B, T, -1)
    return linear(y, w.attn_proj), k, v


def mlp(w: BlockWeights, x: Tensor) -> Tensor:
    return linear(F.relu(linear(x, w.c_fc)).square(), w.mlp_proj)


def _broadcast(scalars: Tensor, x: Tensor) -> Tensor:
    return scalars.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))


def _blend(w: BlockWeights, h: Tensor, ctx: Context) -> Tensor:
    """The x0 / residual blend belongs to the layer: f_l(h) = block_l(lambda_l h + mu_l x0)."""
    if w.resid is None:
        return h
    return _broadcast(w.resid, h) * h + _broadcast(w.x0, h) * ctx.x0.unsqueeze(0)


def block_forward(w: BlockWeights, h: Tensor, ctx: Context, want_mixing: bool = False) -> BlockOutput:
    """n blocks on n states: h (n, B, T, D), or (n, B, S, T, D) with mHC. Returns the blocks' outputs."""
    x = _blend(w, h, ctx)
    if w.hc_attn is None:
        y, k, v = attention(w, norm(x), ctx)
        x = x + y
        return BlockOutput(x + mlp(w, norm(x)), k, v, None)
    pre, res, post = connection_weights(w.hc_attn, x)
    y, k, v = attention(w, norm(_pool(pre, x)), ctx)
    x = _mix(res, x) + _spread(post, y)
    pre2, res2, post2 = connection_weights(w.hc_mlp, x)
    out = _mix(res2, x) + _spread(post2, mlp(w, norm(_pool(pre2, x))))
    mixing = None
    if want_mixing:
        mixing = res2 @ res if w.resid is None else _broadcast(w.resid, res) * (res2 @ res)
    return BlockOutput(out, k, v, mixing)


def block_kv(w: BlockWeights, h: Tensor, ctx: Context) -> tuple[Tensor, Tensor]:
    """The keys and values n blocks compute from inputs h, without the rest of the block: what a KV cache stores
    for the final iterate of a layer-parallel solve."""
    x = _blend(w, h, ctx)
    if w.hc_attn is not None:
        x = _pool(connection_weights(w.hc_attn, x)[0], x)
    _, k, v = project_qkv(w, norm(x), ctx)
    return k, v


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
