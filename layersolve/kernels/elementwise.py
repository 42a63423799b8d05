"""The surrogate Newton correction fused with the residual, for the elementwise surrogates A_l = I, a_l I or
diag(a_l) (docs/kernels.md).

Maths (docs/math.md eq. (4)): from the trace h (n+1, *S) and the layer outputs F_l = f_l(h_{l-1}) (n, *S),

    r_l = F_l - h_l,   delta_l = a_l * delta_{l-1} + r_l   (delta_0 = 0),   h'_l = h_l + delta_l,   h'_0 = h_0,

with a_l = 1 (a None: IDN's prefix sum), one scalar per layer (a (n,): Scaled, damping), or one per state entry
(a (n, *S): Diagonal). Also s_l = sum(delta_l^2), the squared step norms.

Layout: states are flattened to N = prod(S) columns; each layer's row must be contiguous (a strided stack of rows,
such as a slice or an expanded guess, is read in place; anything else is copied first). Each program owns BLOCK
columns and walks the n layers in registers, reading h and F once and writing h' once (n is small, so this
sequential loop per column is the memory-optimal scan). dtypes: float16, bfloat16, float32, float64; delta and s
accumulate in float32 (float64 for float64 states), coefficients are cast to that dtype, h' is rounded once to the
state dtype. s is reduced without atomics: each program writes its partial sum per layer to an (n, programs)
buffer, which torch sums in float64 afterwards (deterministic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._layout import accumulator, block_size, check_step, programs, rows

Tensor = torch.Tensor
IDENTITY, SCALAR, DIAGONAL = 0, 1, 2
TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _correction_kernel(trace_ptr, outputs_ptr, a_ptr, out_ptr, partial_ptr, n, N, num_programs,
                       stride_trace, stride_outputs, stride_a, stride_out,
                       MODE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    h_ptrs = trace_ptr + cols  # pointers advance by a row per layer: 64-bit offsets for any n * N
    out_ptrs = out_ptr + cols
    f_ptrs = outputs_ptr + cols
    a_ptrs = a_ptr + cols
    tl.store(out_ptrs, tl.load(h_ptrs, mask=mask), mask=mask)  # h'_0 = h_0
    delta = tl.zeros((BLOCK,), dtype=ACC)
    for layer in range(n):
        h_ptrs += stride_trace
        out_ptrs += stride_out
        h = tl.load(h_ptrs, mask=mask, other=0.0).to(ACC)
        f = tl.load(f_ptrs, mask=mask, other=0.0).to(ACC)
        if MODE == 1:
            delta = tl.load(a_ptr + layer).to(ACC) * delta
        elif MODE == 2:
            delta = tl.load(a_ptrs, mask=mask, other=0.0).to(ACC) * delta
            a_ptrs += stride_a
        delta += f - h
        tl.store(out_ptrs, (h + delta).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(partial_ptr + layer * num_programs + pid, tl.sum(delta * delta, axis=0))
        f_ptrs += stride_outputs


def _coefficients(a: Tensor | None, outputs: Tensor, acc: torch.dtype) -> tuple[int, Tensor | None]:
    n = outputs.shape[0]
    if a is None:
        return IDENTITY, None
    if not isinstance(a, Tensor) or not a.is_floating_point():
        raise TypeError(f"a must be None or a floating tensor, got {a!r}")
    if a.device != outputs.device:
        raise ValueError(f"a must be on the outputs' device {outputs.device}, got {a.device}")
    if a.ndim == 0 or tuple(a.shape) == (n,):
        return SCALAR, a.to(acc).expand(n).contiguous()
    if a.shape == outputs.shape:
        return DIAGONAL, rows(a, n)
    raise ValueError(f"a must be None, a scalar, one number per layer ({n},) or a diagonal of the outputs' shape "
                     f"{tuple(outputs.shape)}, got shape {tuple(a.shape)}")


def correction(trace: Tensor, outputs: Tensor, a: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The Triton correction: returns the new trace h' (n+1, *S) in the trace's dtype and the squared step norms
    s (n,) in float64. trace (n+1, *S), outputs (n, *S) on one CUDA device (or any under TRITON_INTERPRET=1);
    a None, a scalar, (n,) or (n, *S)."""
    n = check_step(trace, outputs)
    acc = accumulator(trace.dtype)
    mode, coeff = _coefficients(a, outputs, acc)
    h, f = rows(trace, n + 1), rows(outputs, n)
    size = h.shape[1]
    out = torch.empty((n + 1, size), dtype=trace.dtype, device=trace.device)
    block = block_size(size)
    grid = programs(size, block)
    partial = torch.empty((n, grid), dtype=acc, device=trace.device)
    coeff = f if coeff is None else coeff  # never read for the identity
    _correction_kernel[(grid,)](h, f, coeff, out, partial, n, size, grid,
                                h.stride(0), f.stride(0), coeff.stride(0) if mode == DIAGONAL else 0, out.stride(0),
                                MODE=mode, ACC=TL_DTYPES[acc], BLOCK=block)
    return out.reshape(trace.shape), partial.sum(1, dtype=torch.float64)


def correction_reference(trace: Tensor, outputs: Tensor, a: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The same maths in torch, one layer after another in the accumulation dtype (float32, or float64 for float64
    states)."""
    n = check_step(trace, outputs)
    acc = accumulator(trace.dtype)
    mode, coeff = _coefficients(a, outputs, acc)
    h, f = trace.to(acc), outputs.to(acc)
    delta = torch.zeros_like(h[0])
    new, squares = [trace[0]], []
    for layer in range(n):
        if mode == SCALAR:
            delta = coeff[layer] * delta
        elif mode == DIAGONAL:
            delta = coeff[layer].reshape(delta.shape).to(acc) * delta
        delta = delta + (f[layer] - h[layer + 1])
        new.append((h[layer + 1] + delta).to(trace.dtype))
        squares.append(delta.double().square().sum())
    return torch.stack(new), torch.stack(squares) if squares else trace.new_zeros(0, dtype=torch.float64)
