"""Mixing: J~_l = M_l, an S x S matrix acting on the stream axis of the state. SNLP's HC Newton (HCN): for a
hyper-connected (mHC) block the residual streams are mixed by H_res, so M_l = H_res_mlp . H_res_attn is the exact
Jacobian of the skip path. The recurrence is a small-matrix scan."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._recurrence import MatrixMap
from .._system import LayerSystem
from ._base import Jacobian, Step


@dataclass(frozen=True)
class Mixing(Jacobian):
    """matrices: (L, S, S) static (or (L, *rest, S, S), see MatrixMap), acting on state dim `dim`; or None for the
    system's own mixing (static or input-dependent) on its stream_dim."""

    matrices: torch.Tensor | None = None
    dim: int | None = None

    def _dim(self, system: LayerSystem) -> int:
        dim = self.dim if self.matrices is not None or self.dim is not None else system.stream_dim
        if dim is None:
            raise ValueError("Mixing: give dim=, the state dim the matrices act on")
        return dim

    def check(self, system, layers, state):
        if self.matrices is None and system.mixing is None:
            raise ValueError("Mixing() without matrices needs a system that provides mixing: pass "
                             "Mixing(matrices, dim=...) or build the system with mixing= and stream_dim=")
        dim = self._dim(system)
        if not 0 <= dim < state.ndim:
            raise ValueError(f"Mixing: dim={dim} is not a dim of the state (shape {tuple(state.shape)})")
        m = self.matrices if self.matrices is not None else system.mixing
        if isinstance(m, torch.Tensor):
            _check_matrices(m, system.num_layers, state, dim)

    def linearize(self, step: Step) -> MatrixMap:
        dim = self._dim(step.system)
        if self.matrices is not None:
            matrices = self.matrices[step.layers].to(step.inputs.device)
        else:
            matrices = step.system.mixing_matrices(step.layers, step.inputs)
            if callable(step.system.mixing):  # input-dependent: checked as it arrives
                _check_matrices(matrices, step.num_layers, step.inputs[0], dim)
        return MatrixMap(matrices, dim)


def _check_matrices(m: torch.Tensor, num_layers: int, state: torch.Tensor, dim: int) -> None:
    streams = state.shape[dim]
    if m.ndim < 3 or m.shape[0] != num_layers or tuple(m.shape[-2:]) != (streams, streams):
        raise ValueError(f"Mixing: matrices have shape {tuple(m.shape)}, expected (L={num_layers}, ..., "
                         f"S={streams}, S={streams}) for a state of shape {tuple(state.shape)} with the stream "
                         f"axis at dim {dim}")
