"""A block's x0 / residual blend and the parameter-free RMSNorm of its attention input, in one pass (docs/kernels.md).

Maths (nanochat's blend, block._attention_input, then block.norm): for layer l of a stack h (n, ..., D),

    x_l = resid_l * h_l + x0_lambda_l * x0,        y_l = x_l / sqrt(mean_D(x_l^2) + eps),

with x0 (..., D) shared by every layer and eps = finfo(float32).eps (float64's for float64): what
F.rms_norm(x, (D,)) uses when eps is None, its computation dtype being float32 for float16 / bfloat16 / float32.
resid=None (and x0=None, x0_lambda=None) is the plain norm: x = h.

Layout: h viewed as rows (n * R, D), R = prod(h.shape[1:-1]), each row contiguous (copied first otherwise); x0 as
(R, D). One program per row holds the whole row (BLOCK_D = D rounded up to a power of two). Precision follows
torch's: the lambdas are rounded to h's dtype, each product and the sum are rounded to it as torch's elementwise ops
do, so x is torch's blend (to the bit in float16 / bfloat16; in float32 / float64 up to a fused multiply-add the
compiler may form); the norm then upcasts x to float32 (float64 stays), sums the squares, and rounds y to h's dtype
once. dtypes: float16, bfloat16, float32, float64.

`blend_norm` takes the kernel where layersolve.kernels.use_triton says so (CUDA, or TRITON_INTERPRET=1; no
autograd, no torch.compile tracing) and `blend_norm_reference`, the torch maths, otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from layersolve.kernels import SUPPORTED_DTYPES, use_triton

try:  # triton is a dependency on Linux only; without it blend_norm always takes the torch path
    import triton
    import triton.language as tl
except ImportError:
    triton = None

Tensor = torch.Tensor

if triton is not None:

    @triton.jit
    def _blend_norm_kernel(h_ptr, x0_ptr, resid_ptr, x0_lambda_ptr, x_ptr, y_ptr, rows_per_layer, D, eps,
                           stride_h, stride_x0, stride_x, stride_y,
                           BLEND: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        mask = cols < D
        dtype = h_ptr.dtype.element_ty
        h = tl.load(h_ptr + row * stride_h + cols, mask=mask, other=0.0)
        if BLEND:
            layer = row // rows_per_layer
            x0 = tl.load(x0_ptr + (row % rows_per_layer) * stride_x0 + cols, mask=mask, other=0.0)
            resid = tl.load(resid_ptr + layer).to(dtype).to(ACC)
            x0_lambda = tl.load(x0_lambda_ptr + layer).to(dtype).to(ACC)
            kept = (resid * h.to(ACC)).to(dtype)  # rounded per op, as torch's elementwise ops in h's dtype
            added = (x0_lambda * x0.to(ACC)).to(dtype)
            x = (kept.to(ACC) + added.to(ACC)).to(dtype)
            tl.store(x_ptr + row * stride_x + cols, x, mask=mask)
        else:
            x = h
        xf = x.to(ACC)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        tl.store(y_ptr + row * stride_y + cols, (xf * rstd).to(dtype), mask=mask)


def _check(h: Tensor, x0: Tensor | None, resid: Tensor | None, x0_lambda: Tensor | None) -> None:
    if not isinstance(h, Tensor) or h.dtype not in SUPPORTED_DTYPES or h.ndim < 2:
        raise TypeError(f"h must be a float16, bfloat16, float32 or float64 tensor (n, ..., D), got "
                        f"{h.dtype if isinstance(h, Tensor) else type(h).__name__} of shape "
                        f"{tuple(h.shape) if isinstance(h, Tensor) else '?'}")
    given = [v is not None for v in (x0, resid, x0_lambda)]
    if any(given) and not all(given):
        raise ValueError("x0, resid and x0_lambda must be given together (the blend) or all be None (the plain norm)")
    if not any(given):
        return
    if tuple(x0.shape) != tuple(h.shape[1:]) or x0.dtype != h.dtype:
        raise ValueError(f"x0 must have h's dtype {h.dtype} and shape h.shape[1:] = {tuple(h.shape[1:])}, got "
                         f"{x0.dtype} of shape {tuple(x0.shape)}")
    for name, lam in (("resid", resid), ("x0_lambda", x0_lambda)):
        if not lam.is_floating_point() or tuple(lam.shape) != (h.shape[0],):
            raise ValueError(f"{name} must be a floating tensor of shape (n={h.shape[0]},), got {lam.dtype} of "
                             f"shape {tuple(lam.shape)}")


def _rows(x: Tensor, width: int) -> Tensor:
    flat = x.reshape(-1, width)
    return flat if flat.stride(1) == 1 or width <= 1 else flat.contiguous()


def blend_norm_triton(h: Tensor, x0: Tensor | None, resid: Tensor | None,
                      x0_lambda: Tensor | None) -> tuple[Tensor, Tensor]:
    """The Triton launcher of blend_norm (same arguments and results); tensors on one CUDA device (or any under
    TRITON_INTERPRET=1)."""
    _check(h, x0, resid, x0_lambda)
    width = h.shape[-1]
    blend = resid is not None
    hr = _rows(h, width)
    x0r = _rows(x0, width) if blend else hr
    rows = hr.shape[0]
    y = torch.empty((rows, width), dtype=h.dtype, device=h.device)
    x = torch.empty_like(y) if blend else hr
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    resid_, x0_lambda_ = (resid.contiguous(), x0_lambda.contiguous()) if blend else (hr, hr)  # unread without blend
    if rows:
        _blend_norm_kernel[(rows,)](hr, x0r, resid_, x0_lambda_, x, y, x0r.shape[0] if blend else 1,
                                    width, torch.finfo(acc).eps, hr.stride(0), x0r.stride(0), x.stride(0), y.stride(0),
                                    BLEND=blend, ACC=tl.float64 if acc == torch.float64 else tl.float32,
                                    BLOCK_D=triton.next_power_of_2(width),
                                    num_warps=4 if width <= 2048 else 8)
    return (x.reshape(h.shape) if blend else h), y.reshape(h.shape)


def blend_norm_reference(h: Tensor, x0: Tensor | None, resid: Tensor | None,
                         x0_lambda: Tensor | None) -> tuple[Tensor, Tensor]:
    """The torch maths: the model's blend in h's dtype, then F.rms_norm over the last dim with its default eps."""
    _check(h, x0, resid, x0_lambda)
    x = h if resid is None else blend(h, x0, resid, x0_lambda)
    return x, F.rms_norm(x, (x.size(-1),))


def blend(h: Tensor, x0: Tensor, resid: Tensor, x0_lambda: Tensor) -> Tensor:
    """The blend alone, x = resid_l * h_l + x0_lambda_l * x0, in torch (unchecked: the block's CPU path, where a
    kernel launch is not on offer and every microsecond of dispatch shows in decoding)."""
    shape = (-1, *([1] * (h.ndim - 1)))
    return resid.to(h.dtype).reshape(shape) * h + x0_lambda.to(h.dtype).reshape(shape) * x0.unsqueeze(0)


def blend_norm(h: Tensor, x0: Tensor | None, resid: Tensor | None,
               x0_lambda: Tensor | None) -> tuple[Tensor, Tensor]:
    """(x, rms_norm(x)) with x = resid_l * h_l + x0_lambda_l * x0 for every layer l of h.

    h: (n, ..., D), a stack over n layers; x0: (...,  D) = h.shape[1:], the embedding every layer blends in, in h's
    dtype; resid, x0_lambda: (n,), cast to h's dtype. With x0 = resid = x0_lambda = None, x is h itself (the plain
    norm). Both results have h's shape and dtype. The Triton kernel runs where layersolve.kernels.use_triton says
    so (CUDA tensors without autograd, outside torch.compile); otherwise blend_norm_reference."""
    tensors = [t for t in (h, x0, resid, x0_lambda) if t is not None]
    if all(isinstance(t, Tensor) for t in tensors) and use_triton(*tensors):
        return blend_norm_triton(h, x0, resid, x0_lambda)
    return blend_norm_reference(h, x0, resid, x0_lambda)


def rms_norm(x: Tensor) -> Tensor:
    """F.rms_norm(x, (D,)) over the last dim, by the kernel where blend_norm would take it."""
    return blend_norm(x, None, None, None)[1]
