"""When a tensor goes to a Triton kernel: triton is importable, and either every tensor is on a CUDA device or
triton's interpreter is on (TRITON_INTERPRET=1: the kernels run on the CPU through numpy, for the tests). Without
the interpreter a launch on CPU tensors fails ("0 active drivers"), so the device is checked, never assumed.

The kernels read raw memory and have no derivatives, so a tensor that autograd tracks, that carries a forward-mode
tangent, that a torch.func transform (vmap, jvp, grad) wraps, or that is a subclass keeps the torch path, as does
code that torch.compile traces (it makes its own fused kernels). This module imports nothing of triton until it is
asked about a tensor."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch.autograd import forward_ad

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.cache
def _available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether triton's interpreter is on, read the way triton reads it (its knobs where it has them)."""
    if not _available() or not os.environ.get("TRITON_INTERPRET"):
        return False
    import triton

    knobs = getattr(triton, "knobs", None)
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ["TRITON_INTERPRET"] == "1"


def _plain(t: torch.Tensor) -> bool:
    """A tensor whose memory is all there is to it: a torch.Tensor (or Parameter) that no torch.func transform wraps
    and that carries no forward-mode tangent."""
    return (type(t) in (torch.Tensor, torch.nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t)
            and forward_ad.unpack_dual(t).tangent is None)


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when a kernel should run on `tensors`: triton is importable, torch.compile is not tracing, all of them
    are plain tensors (see _plain) with a dtype in SUPPORTED_DTYPES on one device, none needs a gradient (under grad
    mode), and that device is CUDA or the interpreter is on."""
    if not tensors or not _available() or torch.compiler.is_compiling():
        return False
    device = tensors[0].device
    if device.type != "cuda" and not interpreting():  # first: the CPU's answer, at every decoding step
        return False
    if any(t.device != device or t.dtype not in SUPPORTED_DTYPES or not _plain(t) for t in tensors):
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
