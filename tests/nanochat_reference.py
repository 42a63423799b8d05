"""Independent reference forward pass of nanochat's GPT (karpathy/nanochat
`nanochat/gpt.py`) and of the SNLP fork's variant (phymhan/nanochat-snlp), used
as a test oracle. Written from the original code's behaviour, deliberately not
from this project's models/ package, and kept as a plain loop over layers with
explicit attention masks (no F.scaled_dot_product_attention).

Everything is computed in one dtype (by default that of `lm_head.weight`),
including the rotary tables, so float64 state dicts give a float64 oracle.
"""
import math

import torch
import torch.nn.functional as F

# Fork defaults for the optional GPTConfig fields (phymhan/nanochat-snlp GPTConfig).
DEFAULTS = dict(no_x0_resid=False, no_ve=False, use_mhc=False, mhc_num_streams=4,
                mhc_sinkhorn_iters=10, mhc_sinkhorn_tau=0.05, num_mtp_steps=0)
ROPE_BASE = 100000      # nanochat's _precompute_rotary_embeddings(base=100000)
SMEAR_CHANNELS = 24     # smear_gate = Linear(24, 1)
VE_GATE_CHANNELS = 12   # attn.ve_gate = Linear(12, n_kv_head)
SOFTCAP = 15.0


def _cfg(cfg):
    return {**DEFAULTS, **cfg}


def padded_vocab(vocab_size, multiple=64):
    # GPT(pad_vocab_size_to=64): wte, lm_head and value_embeds use the padded size.
    return -(-vocab_size // multiple) * multiple


def has_ve(i, n_layer):
    # Alternating layers with value embeddings; the last layer always has one.
    return i % 2 == (n_layer - 1) % 2


def expected_shapes(cfg):
    """state_dict key -> shape of the fork's GPT(GPTConfig(**cfg)). The rotary
    cos/sin and the fork's reg_warmup_factor buffers are non-persistent."""
    c = _cfg(cfg)
    L, D, V = c["n_layer"], c["n_embd"], padded_vocab(c["vocab_size"])
    hd = D // c["n_head"]
    kv_dim = c["n_kv_head"] * hd
    S = c["mhc_num_streams"]
    shapes = {
        "transformer.wte.weight": (V, D),
        "lm_head.weight": (V, D),
        # The scalars always exist, even when no_x0_resid makes them unused.
        "resid_lambdas": (L,),
        "x0_lambdas": (L,),
        "smear_gate.weight": (1, SMEAR_CHANNELS),
        "smear_lambda": (1,),
        "backout_lambda": (1,),
    }
    for i in range(L):
        p = f"transformer.h.{i}."
        shapes[p + "attn.c_q.weight"] = (c["n_head"] * hd, D)
        shapes[p + "attn.c_k.weight"] = (kv_dim, D)
        shapes[p + "attn.c_v.weight"] = (kv_dim, D)
        shapes[p + "attn.c_proj.weight"] = (D, D)
        shapes[p + "mlp.c_fc.weight"] = (4 * D, D)
        shapes[p + "mlp.c_proj.weight"] = (D, 4 * D)
        if has_ve(i, L):
            # value_embeds are built whenever has_ve, even with no_ve=True; only
            # the gate is dropped (ve_gate = None when no_ve).
            shapes[f"value_embeds.{i}.weight"] = (V, kv_dim)
            if not c["no_ve"]:
                shapes[p + "attn.ve_gate.weight"] = (c["n_kv_head"], VE_GATE_CHANNELS)
        if c["use_mhc"]:
            for hc in ("hc_attn", "hc_mlp"):
                shapes[p + hc + ".H_res_logits"] = (S, S)
                shapes[p + hc + ".H_pre_logits"] = (S,)
                shapes[p + hc + ".H_post_logits"] = (S,)
    for k in range(c["num_mtp_steps"]):  # MTP heads: training-only, unused by logits
        shapes[f"mtp_projs.{k}.weight"] = (D, D)
    return shapes


def expected_state_dict_keys(cfg):
    return set(expected_shapes(cfg))


def window_sizes(cfg):
    """Left window per layer: pattern tiled over layers, last layer forced to L.
    L = sequence_len; S = a quarter of it rounded up to a multiple of 128."""
    pattern = cfg["window_pattern"].upper()
    assert pattern and set(pattern) <= set("SL"), pattern
    long_w = cfg["sequence_len"]
    short_w = math.ceil(long_w / 4 / 128) * 128  # nanochat: -(-long // 4 // 128) * 128
    sizes = [short_w if pattern[i % len(pattern)] == "S" else long_w
             for i in range(cfg["n_layer"])]
    sizes[-1] = long_w
    return sizes


def rms_norm(x):
    # Parameter-free RMSNorm over the last dim with F.rms_norm's default eps.
    return F.rms_norm(x, (x.size(-1),))


def rotary_tables(T, head_dim, dtype):
    # inv_freq_k = base^(-2k/head_dim); angle(t, k) = t * inv_freq_k.  (T, head_dim/2)
    inv_freq = 1.0 / ROPE_BASE ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)
    angles = torch.outer(torch.arange(T, dtype=dtype), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    # x: (B, T, H, hd). nanochat pairs channel k with k + hd/2 ("halves" layout,
    # not interleaved) and rotates by -theta: (a, b) -> (a cos + b sin, b cos - a sin).
    half = x.size(-1) // 2
    a, b = x[..., :half], x[..., half:]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]   # (1, T, 1, hd/2)
    return torch.cat([a * cos + b * sin, b * cos - a * sin], dim=-1)


def attention(x, ve, W, c, window, cos, sin):
    """x: (B, T, D) already normed; ve: (B, T, kv_dim) or None. Returns (B, T, D)."""
    B, T, D = x.shape
    H, Hkv = c["n_head"], c["n_kv_head"]
    hd = D // H
    q = (x @ W("attn.c_q.weight").T).view(B, T, H, hd)
    k = (x @ W("attn.c_k.weight").T).view(B, T, Hkv, hd)
    v = (x @ W("attn.c_v.weight").T).view(B, T, Hkv, hd)
    if ve is not None:
        # ResFormer value residual; per-kv-head gate in (0, 3) from the first 12 channels.
        gate = 3 * torch.sigmoid(x[..., :VE_GATE_CHANNELS] @ W("attn.ve_gate.weight").T)  # (B, T, Hkv)
        v = v + gate.unsqueeze(-1) * ve.view(B, T, Hkv, hd)
    # Rotary first, then QK RMS-norm, then both scaled by 1.2.
    q = rms_norm(apply_rotary(q, cos, sin)) * 1.2
    k = rms_norm(apply_rotary(k, cos, sin)) * 1.2
    # GQA: query head h reads kv head h // (H / Hkv) (repeat_interleave semantics).
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(hd)  # (B, H, T, T)
    pos = torch.arange(T)
    dist = pos[:, None] - pos[None, :]                               # i - j
    allowed = (dist >= 0) & (dist <= window)                         # causal + left window
    scores = scores.masked_fill(~allowed, float("-inf"))
    y = torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), v).reshape(B, T, D)
    return y @ W("attn.c_proj.weight").T


def mlp(x, W):
    return F.relu(x @ W("mlp.c_fc.weight").T).square() @ W("mlp.c_proj.weight").T


def sinkhorn_log(logits, iters, tau):
    """Fork's log-domain Sinkhorn: start from u = v = 0, alternate row then column
    normalisation `iters` times, return exp(Z + u_i + v_j) with Z = logits / tau."""
    Z = logits / tau
    u = torch.zeros(Z.shape[0], dtype=Z.dtype)
    v = torch.zeros(Z.shape[1], dtype=Z.dtype)
    for _ in range(iters):
        u = -torch.logsumexp(Z + v[None, :], dim=1)
        v = -torch.logsumexp(Z + u[:, None], dim=0)
    return torch.exp(Z + u[:, None] + v[None, :])


def mhc_sublayer(streams, branch, W, name, c):
    """One hyper-connected sublayer. streams: (B, S, T, D)."""
    H_res = sinkhorn_log(W(name + ".H_res_logits"), c["mhc_sinkhorn_iters"], c["mhc_sinkhorn_tau"])
    H_pre = W(name + ".H_pre_logits").softmax(dim=-1)     # (S,)
    H_post = W(name + ".H_post_logits").softmax(dim=-1)   # (S,)
    mixed = torch.einsum("ij,bjtd->bitd", H_res, streams)  # width: stream mixing
    branch_in = torch.einsum("j,bjtd->btd", H_pre, streams)  # width: pool to (B, T, D)
    out = branch(rms_norm(branch_in))                      # pre-norm branch, (B, T, D)
    return mixed + H_post[None, :, None, None] * out[:, None]  # depth connection


def reference_logits(state, cfg, idx, dtype=None):
    """Logits (B, T, vocab_size) of nanochat's forward(idx) with no KV cache."""
    c = _cfg(cfg)
    dtype = dtype or state["lm_head.weight"].dtype
    get = lambda key: state[key].to(dtype)
    B, T = idx.shape
    L, D = c["n_layer"], c["n_embd"]
    windows = window_sizes(c)
    cos, sin = rotary_tables(T, D // c["n_head"], dtype)

    # Token embedding followed by a parameter-free RMSNorm.
    x = rms_norm(get("transformer.wte.weight")[idx])                  # (B, T, D)
    # Smear: x[t] += smear_lambda * sigmoid(gate(x[t, :24])) * x[t-1] for t >= 1,
    # with gate and x[t-1] taken from the normed, un-smeared embedding.
    if T > 1:
        g = get("smear_lambda") * torch.sigmoid(x[:, 1:, :SMEAR_CHANNELS] @ get("smear_gate.weight").T)
        x = torch.cat([x[:, :1], x[:, 1:] + g * x[:, :-1]], dim=1)
    # mHC: replicate into S streams after the smear; x0 is the replicated tensor.
    if c["use_mhc"]:
        x = x[:, None].expand(B, c["mhc_num_streams"], T, D)         # (B, S, T, D)
    x0 = x
    backout_layer, x_backout = L // 2, None

    for i in range(L):
        W = lambda name, i=i: get(f"transformer.h.{i}.{name}")
        if not c["no_x0_resid"]:
            x = get("resid_lambdas")[i] * x + get("x0_lambdas")[i] * x0
        ve = None
        if has_ve(i, L) and not c["no_ve"]:
            ve = get(f"value_embeds.{i}.weight")[idx]                  # (B, T, kv_dim)
        attn = lambda h, i=i, W=W, ve=ve: attention(h, ve, W, c, windows[i], cos, sin)
        if c["use_mhc"]:
            x = mhc_sublayer(x, attn, W, "hc_attn", c)
            x = mhc_sublayer(x, lambda h, W=W: mlp(h, W), W, "hc_mlp", c)
        else:
            x = x + attn(rms_norm(x))
            x = x + mlp(rms_norm(x), W)
        if i == backout_layer:
            x_backout = x                        # residual right after block L // 2

    if c["use_mhc"]:                             # collapse streams by summing
        x, x_backout = x.sum(dim=1), x_backout.sum(dim=1)
    x = rms_norm(x - get("backout_lambda") * x_backout)
    logits = (x @ get("lm_head.weight").T)[..., :c["vocab_size"]]    # crop padded vocab
    return SOFTCAP * torch.tanh(logits / SOFTCAP)
