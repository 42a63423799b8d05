"""The linear recurrence across depth, x_l = A_l x_{l-1} + b_l (l = 1..n, x_0 = 0), for structured A.

Every Newton step of the driver is one such recurrence: x = the change of the trace, A_l = J~_l (the surrogate
Jacobian), b_l = f_l(h_{l-1}^k) - h_l^k (minus the residual). A `LinearMap` holds A_1..A_n for a block of n layers
in one structure and solves the recurrence one of two ways, chosen by an object:

- `Sweep()`: forward substitution, n sequential steps (the reference);
- `Scan()`: an associative (parallel prefix) scan over depth with the combine
  (A2, b2) o (A1, b1) = (A2 A1, A2 b1 + b2): ceil(log2 n) rounds of batched work (Hillis-Steele).

Structures: zero, identity (a prefix sum), elementwise (a scalar per layer, or a diagonal), matrix (S x S on one
state dim, the stream axis of a hyper-connected model; or N x N on the flattened state, the dense DEER case), and
matrix-free operators (exact JVPs), which can only sweep.

Tensors are stacked on dim 0 over layers: b and x are (n, *S).

`correct(trace, outputs, recurrence)` is the driver's whole step around the solve: the residual, the solve, the
new trace and its step norms. Identity, elementwise and static stream-mixing maps run it as one fused Triton kernel
(layersolve.kernels) when the tensors are on CUDA (or the interpreter is on) and the recurrence is a Scan; every
other case is the torch maths of `LinearMap.correct`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch

from . import kernels

Tensor = torch.Tensor
Pair = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Scan:
    """Solve a structured recurrence by an associative scan over depth: log depth, O(n log n) batched work.
    A map with no associative combine (matrix-free JVPs) sweeps instead."""


@dataclass(frozen=True)
class Sweep:
    """Solve a recurrence by forward substitution, one layer after another: depth n. For `Exact`, one JVP per
    layer."""


Recurrence = Union[Scan, Sweep]


def check_recurrence(recurrence, name: str) -> None:
    if not isinstance(recurrence, (Scan, Sweep)):
        raise TypeError(f"{name} must be ls.Scan() (associative scan) or ls.Sweep() (forward substitution), "
                        f"got {recurrence!r}")


def associative_scan(combine: Callable[[Sequence[Tensor], Sequence[Tensor]], Sequence[Tensor]],
                     elems: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Inclusive scan along dim 0: out_l = elems_l o elems_{l-1} o ... o elems_1.

    `combine(later, earlier)` composes two batches of elements (tuples of tensors with equal leading dims) and must
    be associative. Hillis-Steele: round r combines each element with the one 2^r before it, so the critical path is
    ceil(log2 n) combines and the work O(n log n), all batched.
    """
    elems = tuple(elems)
    n = elems[0].shape[0]
    offset = 1
    while offset < n:
        later = tuple(e[offset:] for e in elems)
        earlier = tuple(e[:-offset] for e in elems)
        combined = combine(later, earlier)
        elems = tuple(torch.cat([e[:offset], c.expand_as(e[offset:])]) for e, c in zip(elems, combined))
        offset *= 2
    return elems


def layer_norms(x: Tensor) -> Tensor:
    """Per-layer L2 norms of a stack (n, *S) -> (n,), detached, in float64. A large CPU stack of lower precision is
    reduced in float32 first: a float64 copy of it costs more than its norms (12 x 512 x 256 float32, as a
    prefill's residual: ~2.5 ms of a fresh 12 MB copy, three times per iteration, against 0.2 ms), while below
    64k numbers the check below costs more than the copy (a decoding step's stack, 6 x 128: 12 us against 4). A layer's
    squares can overflow or underflow in float32 only if its norm comes out non-finite or below 1e-10 (a zero layer,
    as an exact layer's residual, does too), and only such layers are reduced again, in float64."""
    flat = x.detach().flatten(1)
    if flat.dtype != torch.float64 and flat.device.type == "cpu" and flat.numel() >= 1 << 16:
        norms = torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32).double()
        again = ~(torch.isfinite(norms) & (norms >= 1e-10))
        if bool(again.any()):
            norms[again] = torch.linalg.vector_norm(flat[again], dim=1, dtype=torch.float64)
        return norms
    return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float64)


class LinearMap:
    """A_1..A_n for a block of n layers. Subclasses give `apply` (all layers at once), `layer` (one layer), and
    optionally `_scan`; `solve` dispatches."""

    scannable = True

    def apply(self, x: Tensor) -> Tensor:
        """(n, *S) -> (n, *S): A_l x_l for every l, in parallel."""
        raise NotImplementedError

    def layer(self, i: int, v: Tensor) -> Tensor:
        """A_{i+1} v for one state v of shape S (i is 0-based within the block)."""
        raise NotImplementedError

    def scaled(self, c: float) -> "LinearMap":
        """The map c * A (damping uses c = 1 - d)."""
        raise NotImplementedError

    def solve(self, b: Tensor, recurrence: Recurrence = Scan()) -> Tensor:
        """x with x_l = A_l x_{l-1} + b_l, x_0 = 0. b: (n, *S)."""
        check_recurrence(recurrence, "recurrence")
        if isinstance(recurrence, Sweep) or not self.scannable:
            return self._sweep(b)
        return self._scan(b)

    def correct(self, trace: Tensor, outputs: Tensor, recurrence: Recurrence = Scan()) -> Pair:
        """One Newton step over depth (docs/math.md eq. (4)): delta solves delta_l = A_l delta_{l-1} + (F_l - h_l),
        delta_0 = 0. trace: the iterate h (n+1, *S); outputs: F_l = f_l(h_{l-1}) (n, *S). Returns the new trace
        (n+1, *S) (row 0 kept) and the step norms ||delta_l|| (n,) in float64, detached."""
        delta = self.solve(outputs - trace[1:], recurrence)
        return torch.cat([trace[:1], trace[1:] + delta]), layer_norms(delta)

    def _sweep(self, b: Tensor) -> Tensor:
        xs = [b[0]]
        for i in range(1, b.shape[0]):
            xs.append(self.layer(i, xs[-1]) + b[i])
        return torch.stack(xs)

    def _scan(self, b: Tensor) -> Tensor:
        raise NotImplementedError


class ZeroMap(LinearMap):
    """A_l = 0: x = b (Jacobi)."""

    def apply(self, x):
        return torch.zeros_like(x)

    def layer(self, i, v):
        return torch.zeros_like(v)

    def scaled(self, c):
        return self

    def _scan(self, b):
        return b

    _sweep = _scan


class IdentityMap(LinearMap):
    """A_l = I: x is the prefix sum of b (IDN)."""

    def apply(self, x):
        return x

    def layer(self, i, v):
        return v

    def scaled(self, c):
        return ZeroMap() if c == 0 else ElementwiseMap(torch.tensor(float(c), dtype=torch.float64))

    def _scan(self, b):
        # On the CPU, cumsum over the leading dim runs 5-10x slower than n - 1 adds once a layer holds ~1k numbers
        # (12 x 512 x 256 float32: 2.5 ms against 0.37 ms; its kernel walks each column, accumulating in double);
        # below that, and on a GPU, one kernel beats n. In float64 the two are the same numbers.
        if b.device.type == "cpu" and b[0].numel() >= 1024:
            return torch.stack(list(itertools.accumulate(b.unbind(0))))
        return torch.cumsum(b, dim=0)

    def correct(self, trace, outputs, recurrence=Scan()):
        if isinstance(recurrence, Scan) and kernels.use_triton(trace, outputs):
            new, squares = kernels.correction(trace, outputs)
            return new, squares.sqrt()
        return super().correct(trace, outputs, recurrence)


def _elementwise_combine(later: Pair, earlier: Pair) -> Pair:
    (a2, b2), (a1, b1) = later, earlier
    return a2 * a1, a2 * b1 + b2


class ElementwiseMap(LinearMap):
    """A_l = diag(a_l). a: () one scalar for every layer, (n,) a scalar per layer, or (n, *S) a full diagonal.
    Coefficients are cast to the state's dtype where they meet it."""

    def __init__(self, a: Tensor):
        self.a = a

    def _per_layer(self, x: Tensor) -> Tensor:
        a = (self.a if self.a.ndim else self.a.expand(x.shape[0])).to(device=x.device, dtype=x.dtype)
        return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))

    def apply(self, x):
        return self._per_layer(x) * x

    def layer(self, i, v):
        return self._per_layer(v[None])[0 if self.a.ndim == 0 else i] * v

    def scaled(self, c):
        return ZeroMap() if c == 0 else ElementwiseMap(self.a * c)

    def _scan(self, b):
        a = self._per_layer(b)
        return associative_scan(_elementwise_combine, (a, b))[1]

    def correct(self, trace, outputs, recurrence=Scan()):
        a = self.a.to(trace.device)
        fused = a.ndim == 0 or tuple(a.shape) == (outputs.shape[0],) or a.shape == outputs.shape
        if fused and isinstance(recurrence, Scan) and kernels.use_triton(trace, outputs, a):
            new, squares = kernels.correction(trace, outputs, a)
            return new, squares.sqrt()
        return super().correct(trace, outputs, recurrence)


def _matvec(m: Tensor, x: Tensor) -> Tensor:
    return (m @ x.unsqueeze(-1)).squeeze(-1)


def _matrix_combine(later: Pair, earlier: Pair) -> Pair:
    (m2, b2), (m1, b1) = later, earlier
    return m2 @ m1, _matvec(m2, b1) + b2


class MatrixMap(LinearMap):
    """A_l = a matrix acting on one state dim (the stream axis), or on the flattened state.

    matrices: (n, S, S) acting on state dim `dim` (0-based, excluding the layer dim), the same for every other
    index; or (n, *rest, S, S) where `rest` broadcasts against the state's other dims in order (input-dependent
    mixing, one matrix per token). With dim=None the matrices are (n, N, N) on the flattened state, N = prod(S):
    the dense Jacobians of DEER.
    """

    def __init__(self, matrices: Tensor, dim: int | None):
        self.matrices = matrices
        self.dim = dim

    def _stream_last(self, x: Tensor) -> Tensor:
        return x.flatten(1) if self.dim is None else x.movedim(self.dim + 1, -1)

    def _restore(self, y: Tensor, like: Tensor) -> Tensor:
        return y.reshape(like.shape) if self.dim is None else y.movedim(-1, self.dim + 1)

    def _aligned(self, ndim: int) -> Tensor:
        """Matrices shaped to broadcast against a stream-last tensor with `ndim` dims."""
        m = self.matrices
        missing = ndim + 1 - m.ndim
        return m.reshape(m.shape[0], *([1] * missing), *m.shape[1:]) if missing > 0 else m

    def apply(self, x):
        xs = self._stream_last(x)
        return self._restore(_matvec(self._aligned(xs.ndim).to(x.dtype), xs), x)

    def layer(self, i, v):
        xs = self._stream_last(v[None])
        return self._restore(_matvec(self._aligned(xs.ndim)[i:i + 1].to(v.dtype), xs), v[None])[0]

    def scaled(self, c):
        return ZeroMap() if c == 0 else MatrixMap(self.matrices * c, self.dim)

    def _scan(self, b):
        bs = self._stream_last(b)
        m = self._aligned(bs.ndim).to(b.dtype)
        x = associative_scan(_matrix_combine, (m, bs))[1]
        return self._restore(x, b)

    def correct(self, trace, outputs, recurrence=Scan()):
        static = self.dim is not None and self.matrices.ndim == 3  # per-token and dense matrices: torch
        if static and isinstance(recurrence, Scan) and kernels.use_triton(trace, outputs, self.matrices):
            new, squares = kernels.mixing_correction(trace, outputs, self.matrices, self.dim)
            return new, squares.sqrt()
        return super().correct(trace, outputs, recurrence)


class OperatorMap(LinearMap):
    """A matrix-free map: `apply_all(x)` gives A_l x_l for all l (one batched evaluation), `apply_one(i, v)` one
    layer. It has no associative combine (its products are not representable), so it always sweeps."""

    scannable = False

    def __init__(self, apply_all: Callable[[Tensor], Tensor], apply_one: Callable[[int, Tensor], Tensor],
                 scale: float = 1.0):
        self._all, self._one, self.scale = apply_all, apply_one, scale

    def apply(self, x):
        return self.scale * self._all(x)

    def layer(self, i, v):
        return self.scale * self._one(i, v)

    def scaled(self, c):
        return ZeroMap() if c == 0 else OperatorMap(self._all, self._one, self.scale * c)
