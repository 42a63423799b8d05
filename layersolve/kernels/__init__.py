"""Triton kernels for the driver's hot loop: the surrogate Newton correction fused with the residual (identity,
scalar, diagonal and stream-mixing surrogates) and the per-layer residual norms, each beside a pure-torch
reference with the same maths (docs/kernels.md).

`use_triton(*tensors)` says whether a call should take a kernel (CUDA tensors, or the interpreter); callers fall
back to their torch maths otherwise. The kernel modules import triton, so they are imported on first use of one of
their names: `import layersolve` never imports triton, and triton reads TRITON_INTERPRET when it decorates them.
"""

from importlib import import_module

from .dispatch import SUPPORTED_DTYPES, interpreting, use_triton

_LAZY = {
    "correction": "elementwise", "correction_reference": "elementwise",
    "mixing_correction": "mixing", "mixing_correction_reference": "mixing",
    "residual_norms": "norms", "residual_norms_reference": "norms",
}

__all__ = ["SUPPORTED_DTYPES", "interpreting", "use_triton", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_LAZY[name]}", __name__), name)
