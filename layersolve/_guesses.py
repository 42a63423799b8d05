"""Initial guesses for the trace of a parallel segment: h_1..h_n from the segment's first state h_start.

SNLP's names: repeat = "h0", one_step = "batch_fwd", given = "warm" (the previous token's trace when decoding).
A guess is any object with `guess(system, layers, h_start, work) -> (n, *S)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .jacobians import Work
from ._system import LayerSystem


@dataclass(frozen=True)
class Repeat:
    """Every h_l = h_start. Free."""

    def guess(self, system: LayerSystem, layers: slice, h_start: torch.Tensor, work: Work) -> torch.Tensor:
        n = layers.stop - layers.start
        return h_start.expand(n, *h_start.shape).clone()


@dataclass(frozen=True)
class OneStep:
    """One Jacobi sweep from repeat: h_l = f_l(h_start) for every l, one parallel evaluation. The first layer is
    then exact."""

    def guess(self, system: LayerSystem, layers: slice, h_start: torch.Tensor, work: Work) -> torch.Tensor:
        n = layers.stop - layers.start
        work.evaluations += n
        work.depth += 1
        return system.evaluate(layers, h_start.expand(n, *h_start.shape))


@dataclass(frozen=True)
class Given:
    """A trace supplied by the caller: (L+1, *S) with row 0 ignored (h_0 is the solve's), or (L, *S)."""

    trace: torch.Tensor

    def check(self, system: LayerSystem, state: torch.Tensor) -> None:
        rows = self.trace.shape[0] if self.trace.ndim else 0
        if self.trace.shape[1:] != state.shape or rows not in (system.num_layers, system.num_layers + 1):
            raise ValueError(f"Given: trace has shape {tuple(self.trace.shape)}, expected "
                             f"({system.num_layers + 1} or {system.num_layers}, *{tuple(state.shape)})")
        if not torch.isfinite(self.trace).all():
            raise ValueError("Given: trace has non-finite values")

    def guess(self, system: LayerSystem, layers: slice, h_start: torch.Tensor, work: Work) -> torch.Tensor:
        offset = self.trace.shape[0] - system.num_layers  # 1 when row 0 is h_0
        return self.trace[layers.start + offset:layers.stop + offset].to(h_start)


@dataclass(frozen=True)
class Learned:
    """A per-layer low-rank affine predictor of each state from the segment's first state (SNLP's "preheat"):
    h_l ~ h_start + h_start U_l V_l + b_l, acting on the last state dim (features). u: (n, D, r), v: (n, r, D),
    bias: (n, D). Fit it with `Learned.fit` on traces of the same segment."""

    u: torch.Tensor
    v: torch.Tensor
    bias: torch.Tensor

    @classmethod
    def fit(cls, starts: torch.Tensor, states: torch.Tensor, rank: int, ridge: float = 1e-6) -> "Learned":
        """starts: (N, D) first states (one row per token, say); states: (n, N, D) the n layers' states for the same
        rows. Ridge least squares for the change h_l - h_start, truncated to `rank` by SVD."""
        if starts.ndim != 2 or states.ndim != 3 or states.shape[1:] != starts.shape:
            raise ValueError(f"Learned.fit: starts must be (N, D) and states (n, N, D), got {tuple(starts.shape)} "
                             f"and {tuple(states.shape)}")
        if rank < 1:
            raise ValueError(f"Learned.fit: rank must be positive, got {rank}")
        x, y = starts.double(), states.double() - starts.double()
        mx, my = x.mean(0), y.mean(1)  # (D,), (n, D)
        xc = x - mx
        gram = xc.T @ xc + ridge * len(x) * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        maps = torch.linalg.solve(gram, xc.T @ (y - my[:, None]))  # (n, D, D)
        left, sing, right = torch.linalg.svd(maps)
        r = min(rank, x.shape[1])
        u, v = left[..., :r] * sing[:, None, :r], right[:, :r]
        bias = my - mx @ (u @ v)
        return cls(u.to(starts.dtype), v.to(starts.dtype), bias.to(starts.dtype))

    def guess(self, system: LayerSystem, layers: slice, h_start: torch.Tensor, work: Work) -> torch.Tensor:
        n = layers.stop - layers.start
        if self.u.shape[0] != n or self.u.shape[1] != h_start.shape[-1]:
            raise ValueError(f"Learned: fitted for {self.u.shape[0]} layers of width {self.u.shape[1]}, asked for "
                             f"{n} layers of width {h_start.shape[-1]}")
        flat = h_start.reshape(-1, h_start.shape[-1])  # (N, D)
        change = torch.einsum("nd,ldr,lre->lne", flat, self.u.to(flat), self.v.to(flat)) + self.bias.to(flat)[:, None]
        return (flat + change).reshape(n, *h_start.shape)
