"""Where the kernel tests run, and the fixture that makes kernels runnable there.

With CUDA the kernels run compiled on the GPU; without it, through triton's interpreter on the CPU. triton.jit
chooses between the two when it decorates a kernel (triton 3.7.1: `jit` reads knobs.runtime.interpret, i.e.
TRITON_INTERPRET, in the decorator, not at launch), so the fixture switches the interpreter on for the kernel tests
alone and reloads the kernel modules under it, then reloads them without it: the rest of the session keeps the torch
paths on CPU tensors (layersolve.kernels.use_triton reads the variable at every call)."""

from __future__ import annotations

import importlib

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
KERNEL_MODULES = ("layersolve.kernels.elementwise", "layersolve.kernels.mixing", "layersolve.kernels.norms",
                  "models.nanochat.kernels")


def _reload() -> None:
    for name in KERNEL_MODULES:
        importlib.reload(importlib.import_module(name))


@pytest.fixture(scope="module")
def kernels_on():
    """Kernels run on DEVICE for the tests of the module that uses this fixture."""
    pytest.importorskip("triton")
    if CUDA:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        _reload()
        yield
    _reload()


def ulp_tolerance(dtype: torch.dtype) -> dict:
    """assert_close tolerances for a kernel against its reference computed in the same accumulation dtype.

    float64 / float32: the same operations in the same order per entry; what may differ is a fused multiply-add on
    the GPU and the order of the squared-norm sums (per block, then over blocks), so a few ulps of the
    accumulation dtype. float16 / bfloat16: the result is rounded once to the state dtype, and triton 3.7.1's
    interpreter converts float32 to bfloat16 by truncation where GPUs round to nearest: one ulp of the dtype."""
    eps = torch.finfo(dtype).eps
    scale = {torch.float64: 64.0, torch.float32: 64.0}.get(dtype, 2.0)
    return {"rtol": scale * eps, "atol": scale * eps}
