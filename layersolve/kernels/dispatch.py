"""When a tensor goes to a Triton kernel: triton is importable, and either every tensor is on a CUDA device or
triton's interpreter is on (TRITON_INTERPRET=1: the kernels run on the CPU through numpy, for the tests). Without
the interpreter a launch on CPU tensors fails ("0 active drivers"), so the device is checked, never assumed.

The kernels have no backward and torch.compile makes its own fused code, so autograd through the inputs and
compilation both keep the torch path. This module imports nothing of triton until it is asked about a tensor."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

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


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when a kernel should run on `tensors`: triton is importable, none of them needs a gradient (under grad
    mode) or is traced by torch.compile, all have a dtype in SUPPORTED_DTYPES and share one device, and that device
    is CUDA or the interpreter is on."""
    if not tensors or not _available() or torch.compiler.is_compiling():
        return False
    device = tensors[0].device
    if any(t.device != device or t.dtype not in SUPPORTED_DTYPES for t in tensors):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return device.type == "cuda" or interpreting()
