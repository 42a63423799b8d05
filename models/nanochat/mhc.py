"""Manifold-constrained hyper-connections (mHC): S residual streams mixed by doubly stochastic matrices.

Static (the SNLP fork): per sublayer, H_res = Sinkhorn(H_res_logits / tau) (log domain), H_pre = softmax(H_pre_logits),
H_post = softmax(H_post_logits). Dynamic (DeepSeek's mHC, arXiv 2512.24880, behind `GPTConfig.mhc_dynamic`): the
same matrices, computed per token from the RMS-normed, flattened streams x~ (S*D):
    H_res = Sinkhorn((a_res * mat(x~ W_res) + H_res_logits) / tau),  H_pre = sigmoid(a_pre * x~ W_pre + H_pre_logits),
    H_post = 2 sigmoid(a_post * x~ W_post + H_post_logits).

A block's skip path mixes the streams twice, x -> H_res_mlp H_res_attn x, after the blend has scaled h by resid_l:
its Jacobian resid_l H_res_mlp H_res_attn on the stream axis is the mixing SNLP's HCN surrogate uses (`skip_mixing`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import GPTConfig

Tensor = torch.Tensor


def sinkhorn_log(logits: Tensor, iters: int, tau: float) -> Tensor:
    """Doubly stochastic projection of exp(logits / tau) over the last two dims, by log-domain Sinkhorn: rows are
    normalized, then columns, `iters` times (the last step normalizes columns exactly)."""
    z = logits / tau
    u = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
    v = torch.zeros_like(u)
    for _ in range(iters):
        u = -torch.logsumexp(z + v.unsqueeze(-2), dim=-1)
        v = -torch.logsumexp(z + u.unsqueeze(-1), dim=-2)
    return torch.exp(z + u.unsqueeze(-1) + v.unsqueeze(-2))


@dataclass(frozen=True)
class HCWeights:
    """One sublayer's hyper-connection parameters for n stacked layers: res (n, S, S), pre and post (n, S) logits;
    dyn_proj (n, S*S + 2S, S*D) and dyn_alpha (n, 3) for dynamic mHC, else None."""

    res: Tensor
    pre: Tensor
    post: Tensor
    iters: int
    tau: float
    dyn_proj: Tensor | None = None
    dyn_alpha: Tensor | None = None

    def sinkhorn(self, logits: Tensor) -> Tensor:
        return sinkhorn_log(logits, self.iters, self.tau)


def connection_weights(hc: HCWeights, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(H_pre, H_res, H_post) for states x (n, B, S, T, D): (n, S), (n, S, S), (n, S) when static; per token
    (n, B, T, S), (n, B, T, S, S), (n, B, T, S) when dynamic."""
    if hc.dyn_proj is None:
        return F.softmax(hc.pre, dim=-1), hc.sinkhorn(hc.res), F.softmax(hc.post, dim=-1)
    n, B, S, T, D = x.shape
    feats = F.rms_norm(x.permute(0, 1, 3, 2, 4).reshape(n, B, T, S * D), (S * D,))  # (n, B, T, S*D)
    dyn = (feats.reshape(n, -1, S * D) @ hc.dyn_proj.transpose(1, 2).to(x.dtype)).view(n, B, T, -1)
    alpha = hc.dyn_alpha.to(x.dtype).view(n, 1, 1, 3)
    res_logits = alpha[..., 0:1, None] * dyn[..., : S * S].view(n, B, T, S, S) + hc.res.to(x.dtype)[:, None, None]
    pre = torch.sigmoid(alpha[..., 1:2] * dyn[..., S * S: S * S + S] + hc.pre.to(x.dtype)[:, None, None])
    post = 2 * torch.sigmoid(alpha[..., 2:3] * dyn[..., S * S + S:] + hc.post.to(x.dtype)[:, None, None])
    return pre, hc.sinkhorn(res_logits), post


def skip_mixing(res_attn: Tensor, res_mlp: Tensor, resid: Tensor | None) -> Tensor:
    """resid_l * H_res_mlp @ H_res_attn, the exact Jacobian of a block's skip path on the stream axis: per layer
    (n, S, S), or per token (n, B, T, S, S). resid (n,), None without the x0 / resid blend (then 1)."""
    mix = res_mlp @ res_attn
    return mix if resid is None else resid.to(mix.dtype).reshape(-1, *[1] * (mix.ndim - 1)) * mix


def static_mixing(attn: HCWeights, mlp: HCWeights, resid: Tensor | None) -> Tensor:
    """`skip_mixing` of static mHC, one (S, S) matrix per layer: (n, S, S)."""
    return skip_mixing(attn.sinkhorn(attn.res), mlp.sinkhorn(mlp.res), resid)


class HyperConnection(nn.Module):
    """The parameters of one sublayer's hyper-connection, named as in the SNLP fork (H_res_logits, H_pre_logits,
    H_post_logits); dynamic mHC adds dyn_proj.weight and dyn_alpha. `sublayer` counts attention and MLP sublayers
    over the depth (2 per block)."""

    def __init__(self, cfg: GPTConfig, sublayer: int):
        super().__init__()
        S = cfg.mhc_num_streams
        self.iters, self.tau = cfg.mhc_sinkhorn_iters, cfg.mhc_sinkhorn_tau
        self.H_res_logits = nn.Parameter(torch.full((S, S), -0.5).fill_diagonal_(0.0))  # near identity after Sinkhorn
        pre = torch.full((S,), -1.0)
        pre[sublayer % S] = 0.0  # each sublayer starts reading mostly from one stream, round robin
        self.H_pre_logits = nn.Parameter(pre)
        self.H_post_logits = nn.Parameter(torch.zeros(S))
        self.dyn_proj = nn.Linear(S * cfg.n_embd, S * S + 2 * S, bias=False) if cfg.mhc_dynamic else None
        self.dyn_alpha = nn.Parameter(torch.full((3,), 0.01)) if cfg.mhc_dynamic else None

    def weights(self) -> HCWeights:
        """This sublayer's parameters as a stack of one layer (views)."""
        dynamic = self.dyn_proj is not None
        return HCWeights(self.H_res_logits[None], self.H_pre_logits[None], self.H_post_logits[None], self.iters,
                         self.tau, self.dyn_proj.weight[None] if dynamic else None,
                         self.dyn_alpha[None] if dynamic else None)
