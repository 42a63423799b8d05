"""Layer fusion: M consecutive blocks become one wide block (SNLP's FxM; C fused chunks solved across chunks is
the chunkwise decomposition CxFM).

The fused block of blocks m = 1..M reads one input x = mean(resid) h + mean(x0_lambda) x0 and computes
    x + sum_m attn_m(norm(x))  then  + sum_m mlp_m(norm(.)):
the M blocks' heads run as one attention call of M*H heads (each head keeps its own layer's window and value
embedding), their output projections are summed (concatenated along the input dim), and their MLP widths are
concatenated. It is a different function from the M blocks in sequence: a fused model's own sequential forward is
the reference its solves converge to.

Stacked weights fuse by reshaping: layers (C*M, ...) become chunks (C, M * ...).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .block import BlockWeights


def _rows(t: torch.Tensor, m: int) -> torch.Tensor:
    """(C*M, out, in) -> (C, M*out, in): outputs concatenated."""
    return t.reshape(t.shape[0] // m, m * t.shape[1], *t.shape[2:])


def _cols(t: torch.Tensor, m: int) -> torch.Tensor:
    """(C*M, out, in) -> (C, out, M*in): inputs concatenated, so the M maps' outputs are summed."""
    c = t.shape[0] // m
    return t.reshape(c, m, *t.shape[1:]).permute(0, 2, 1, 3).reshape(c, t.shape[1], m * t.shape[2])


def fuse_weights(w: BlockWeights, m: int) -> BlockWeights:
    """Fuse every m consecutive stacked blocks into one."""
    if w.num_layers % m:
        raise ValueError(f"fusion width {m} does not divide the {w.num_layers} layers to fuse")
    if m == 1:
        return w
    if w.hc_attn is not None:
        raise ValueError("fusion of hyper-connected (mHC) blocks is not defined: use fuse=1 with mHC models")
    chunks = w.num_layers // m

    def mean(t):
        return None if t is None else t.reshape(chunks, m).mean(dim=1)

    a, f = w.attn, w.mlp
    attn = replace(a, c_q=_rows(a.c_q, m), c_k=_rows(a.c_k, m), c_v=_rows(a.c_v, m), c_proj=_cols(a.c_proj, m),
                   ve_gate=None if a.ve_gate is None else _rows(a.ve_gate, m), windows=a.windows.reshape(chunks, -1))
    return replace(w, attn=attn, mlp=replace(f, c_fc=_rows(f.c_fc, m), c_proj=_cols(f.c_proj, m)),
                   resid=mean(w.resid), x0=mean(w.x0))


def fuse_value_embeddings(ve: torch.Tensor | None, m: int) -> torch.Tensor | None:
    """(C*M, B, T, KV*hd) -> (C, B, T, M*KV*hd): each fused chunk's kv heads are its blocks' kv heads in order."""
    if ve is None or m == 1:
        return ve
    n, B, T, E = ve.shape
    return ve.reshape(n // m, m, B, T, E).permute(0, 2, 3, 1, 4).reshape(n // m, B, T, m * E)
