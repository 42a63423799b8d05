"""The driver's per-layer residual and output norms from one read of F and h (docs/kernels.md).

Maths (docs/math.md eq. (16)-(17)): from the trace h (n+1, *S) and the layer outputs F_l = f_l(h_{l-1}) (n, *S),

    residual_l = || F_l - h_l ||,   output_l = || F_l ||        (l = 1..n, Euclidean over the state, float64).

Layout: states flattened to N = prod(S) columns, rows contiguous (strided stacks of rows are read in place). A
2-D grid: program (l, b) reads block b of layer l, accumulates both sums of squares in float32 (float64 for float64
states) and writes them to a (2, n, programs) buffer; torch sums the partials in float64 and takes the roots (no
atomics: deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import accumulator, block_size, check_step, programs, rows
from .elementwise import TL_DTYPES

Tensor = torch.Tensor


@triton.jit
def _residual_norms_kernel(trace_ptr, outputs_ptr, partial_ptr, n, N, num_programs, stride_trace, stride_outputs,
                           ACC: tl.constexpr, BLOCK: tl.constexpr):
    layer = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    h = tl.load(trace_ptr + (layer + 1) * stride_trace + cols, mask=mask, other=0.0).to(ACC)
    f = tl.load(outputs_ptr + layer * stride_outputs + cols, mask=mask, other=0.0).to(ACC)
    r = f - h
    at = layer * num_programs + pid
    tl.store(partial_ptr + at, tl.sum(r * r, axis=0))
    tl.store(partial_ptr + n * num_programs + at, tl.sum(f * f, axis=0))


def residual_norms(trace: Tensor, outputs: Tensor) -> tuple[Tensor, Tensor]:
    """The Triton norms: (||F_l - h_l||, ||F_l||), each (n,) float64 on the trace's device. trace (n+1, *S),
    outputs (n, *S)."""
    n = check_step(trace, outputs)
    h, f = rows(trace, n + 1), rows(outputs, n)
    size = h.shape[1]
    acc = accumulator(trace.dtype)
    block = block_size(size)
    grid = programs(size, block)
    partial = torch.empty((2, n, grid), dtype=acc, device=trace.device)
    if n:
        _residual_norms_kernel[(n, grid)](h, f, partial, n, size, grid, h.stride(0), f.stride(0),
                                          ACC=TL_DTYPES[acc], BLOCK=block)
    norms = partial.sum(2, dtype=torch.float64).sqrt()
    return norms[0], norms[1]


def residual_norms_reference(trace: Tensor, outputs: Tensor) -> tuple[Tensor, Tensor]:
    """The same norms in torch, in float64."""
    n = check_step(trace, outputs)
    f = outputs.reshape(n, -1).double()
    return torch.linalg.vector_norm(f - trace[1:].reshape(n, -1).double(), dim=1), torch.linalg.vector_norm(f, dim=1)
