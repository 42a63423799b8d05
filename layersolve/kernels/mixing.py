"""The surrogate Newton correction fused with the residual, for A_l = M_l (S x S) on one state axis: HC Newton, the
static stream mixing of a hyper-connected model (docs/kernels.md).

Maths (docs/math.md eq. (4) and (9)): from the trace h (n+1, *S) and the layer outputs F (n, *S),

    r_l = F_l - h_l,   delta_l = M_l delta_{l-1} + r_l   (delta_0 = 0),   h'_l = h_l + delta_l,   h'_0 = h_0,

where M_l acts on state dim `dim` alone: (M delta)[..., i, ...] = sum_j M[i, j] delta[..., j, ...]. Also
s_l = sum(delta_l^2), the squared step norms.

Layout: each layer's state is viewed in place as (P, S, Q) (P the product of the dims before the stream axis, Q of
those after; a transformer's (B, S, T, D) state is P = B, Q = T D), so no axis is moved. A column is one (p, q);
each program owns BLOCK columns, keeps the (S, BLOCK) tile of delta in registers and walks the n layers, doing
delta = M_l delta + r_l by a broadcast multiply and a sum over j (S is a handful of streams, far too small for
tl.dot). Matrices are static, (n, S, S), cast to the accumulation dtype (float32, float64 for float64 states).
The squared norms are reduced as in elementwise.py: per-program partial sums in an (n, programs) buffer, summed in
float64 by torch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._layout import accumulator, block_size, check_step, programs, rows
from .elementwise import TL_DTYPES

Tensor = torch.Tensor


@triton.jit
def _mixing_correction_kernel(trace_ptr, outputs_ptr, m_ptr, out_ptr, partial_ptr, n, S, Q, C, num_programs,
                              stride_trace, stride_outputs, stride_out,
                              SP: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    streams = tl.arange(0, SP)
    offsets = (cols // Q * S * Q + cols % Q)[None, :] + streams[:, None] * Q  # (SP, BLOCK) within one layer
    mask = (streams[:, None] < S) & (cols[None, :] < C)
    m_offsets = streams[:, None] * S + streams[None, :]  # (SP, SP): M[i, j]
    m_mask = (streams[:, None] < S) & (streams[None, :] < S)
    h_ptrs = trace_ptr + offsets
    out_ptrs = out_ptr + offsets
    f_ptrs = outputs_ptr + offsets
    m_ptrs = m_ptr + m_offsets
    tl.store(out_ptrs, tl.load(h_ptrs, mask=mask), mask=mask)  # h'_0 = h_0
    delta = tl.zeros((SP, BLOCK), dtype=ACC)
    for layer in range(n):
        h_ptrs += stride_trace
        out_ptrs += stride_out
        h = tl.load(h_ptrs, mask=mask, other=0.0).to(ACC)
        f = tl.load(f_ptrs, mask=mask, other=0.0).to(ACC)
        m = tl.load(m_ptrs, mask=m_mask, other=0.0).to(ACC)
        delta = tl.sum(m[:, :, None] * delta[None, :, :], axis=1) + (f - h)
        tl.store(out_ptrs, (h + delta).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + layer * num_programs + pid, tl.sum(tl.sum(delta * delta, axis=1), axis=0))
        f_ptrs += stride_outputs
        m_ptrs += S * S


def _check_matrices(matrices: Tensor, outputs: Tensor, dim: int) -> int:
    state = outputs.shape[1:]
    if not isinstance(dim, int) or isinstance(dim, bool) or not 0 <= dim < len(state):
        raise ValueError(f"dim must be a dim of the state (shape {tuple(state)}), got {dim!r}")
    streams = state[dim]
    if not isinstance(matrices, Tensor) or not matrices.is_floating_point():
        raise TypeError(f"matrices must be a floating tensor (n, S, S), got {type(matrices).__name__}")
    if tuple(matrices.shape) != (outputs.shape[0], streams, streams):
        raise ValueError(f"matrices must have shape (n={outputs.shape[0]}, S={streams}, S={streams}) for states "
                         f"{tuple(state)} mixed on dim {dim}, got {tuple(matrices.shape)}")
    if matrices.device != outputs.device:
        raise ValueError(f"matrices must be on the outputs' device {outputs.device}, got {matrices.device}")
    return streams


def mixing_correction(trace: Tensor, outputs: Tensor, matrices: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The Triton mixing correction: the new trace h' (n+1, *S) in the trace's dtype and the squared step norms
    s (n,) in float64. trace (n+1, *S), outputs (n, *S), matrices (n, S_dim, S_dim) acting on state dim `dim`
    (0-based, excluding the layer dim)."""
    n = check_step(trace, outputs)
    streams = _check_matrices(matrices, outputs, dim)
    acc = accumulator(trace.dtype)
    h, f = rows(trace, n + 1), rows(outputs, n)
    inner = math.prod(outputs.shape[dim + 2:])
    columns = h.shape[1] // max(streams, 1)
    out = torch.empty((n + 1, h.shape[1]), dtype=trace.dtype, device=trace.device)
    padded = triton.next_power_of_2(max(streams, 1))
    block = block_size(columns, cap=max(1, 1024 // padded))
    grid = programs(columns, block)
    partial = torch.empty((n, grid), dtype=acc, device=trace.device)
    m = matrices.to(acc).contiguous()
    _mixing_correction_kernel[(grid,)](h, f, m, out, partial, n, streams, inner, columns, grid,
                                       h.stride(0), f.stride(0), out.stride(0),
                                       SP=padded, ACC=TL_DTYPES[acc], BLOCK=block)
    return out.reshape(trace.shape), partial.sum(1, dtype=torch.float64)


def mixing_correction_reference(trace: Tensor, outputs: Tensor, matrices: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The same maths in torch, one layer after another in the accumulation dtype."""
    n = check_step(trace, outputs)
    _check_matrices(matrices, outputs, dim)
    acc = accumulator(trace.dtype)
    h, f, m = trace.to(acc), outputs.to(acc), matrices.to(acc)
    delta = torch.zeros_like(h[0])
    new, squares = [trace[0]], []
    for layer in range(n):
        mixed = torch.tensordot(m[layer], delta.movedim(dim, 0), dims=([1], [0])).movedim(0, dim)
        delta = mixed + (f[layer] - h[layer + 1])
        new.append((h[layer + 1] + delta).to(trace.dtype))
        squares.append(delta.double().square().sum())
    return torch.stack(new), torch.stack(squares) if squares else trace.new_zeros(0, dtype=torch.float64)
