"""Shared layout helpers of the kernel launchers: stacks viewed as (rows, N) with unit-stride rows, the argument
checks, the accumulation dtype and block sizes. No triton here."""

from __future__ import annotations

import math

import torch

from .dispatch import SUPPORTED_DTYPES

Tensor = torch.Tensor


def rows(x: Tensor, count: int) -> Tensor:
    """x (count, *S) as (count, N), N = prod(S), each row contiguous (a view when it already is; rows may be
    strided, so a slice of a longer stack is not copied)."""
    flat = x.reshape(count, math.prod(x.shape[1:]))
    return flat if flat.stride(1) == 1 or flat.shape[1] <= 1 else flat.contiguous()


def check_step(trace: Tensor, outputs: Tensor) -> int:
    """Check a trace (n+1, *S) and its layer outputs (n, *S); returns n."""
    for name, x in (("trace", trace), ("outputs", outputs)):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if trace.ndim < 1 or tuple(outputs.shape) != (trace.shape[0] - 1, *trace.shape[1:]):
        raise ValueError(f"outputs must have shape (trace.shape[0] - 1, *trace.shape[1:]) = "
                         f"{(trace.shape[0] - 1, *trace.shape[1:]) if trace.ndim else '?'}, got {tuple(outputs.shape)} "
                         f"(trace {tuple(trace.shape)})")
    if outputs.dtype != trace.dtype:
        raise TypeError(f"outputs must have the trace's dtype {trace.dtype}, got {outputs.dtype}")
    if outputs.device != trace.device:
        raise ValueError(f"outputs must be on the trace's device {trace.device}, got {outputs.device}")
    return outputs.shape[0]


def accumulator(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: float64 for float64 states, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def block_size(columns: int, cap: int = 1024) -> int:
    """Columns per program: a power of two from min(128, cap) (a warp group's worth) up to cap, aiming at a few
    hundred programs for large states."""
    target = max(1, math.ceil(columns / 256))
    return max(min(128, cap), min(cap, 1 << (target - 1).bit_length()))


def programs(columns: int, block: int) -> int:
    """Programs covering `columns` in blocks (at least one, so an empty state still launches)."""
    return max(1, -(-columns // block))
