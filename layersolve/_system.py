"""`LayerSystem`: the residual equation h_l = f_l(h_{l-1}), l = 1..L, with f_l evaluable for many layers at once.

The one thing a system must do is `evaluate(layers, inputs)`: apply f_l to inputs[i] for l in the slice `layers`,
all in one batched call. Everything else (JVPs, mixing matrices, per-layer scales, the expected state shape) is
optional structure that strategies use when present.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

Tensor = torch.Tensor
Evaluate = Callable[[slice, Tensor], Tensor]
Jvp = Callable[[slice, Tensor, Tensor], tuple[Tensor, Tensor]]


class LayerSystem:
    """h_l = f_l(h_{l-1}) for l = 1..num_layers. Layer indices in slices are 0-based: slice(0, L) is f_1..f_L.

    evaluate:    evaluate(layers: slice, inputs: (n, *S)) -> (n, *S), f_{layers.start+i+1}(inputs[i]) for each i.
    num_layers:  L.
    jvp:         jvp(layers, inputs, tangents) -> (outputs, J tangents), batched like evaluate. Defaults to
                 torch.func.jvp through evaluate, which works when evaluate is built from torch operations.
    mixing:      the model's own stream-mixing matrices, for `Mixing()`: a tensor (L, S, S) (or (L, *rest, S, S),
                 see `MatrixMap`), or a callable (layers, inputs) -> (n, ..., S, S) for input-dependent mixing.
    stream_dim:  the state dim (0-based, excluding the layer dim) that `mixing` acts on.
    scales:      per-layer scalars (L,), the exact skip-path Jacobian a_l of blocks h -> a_l h + g_l(h), for `Scaled()`.
    state_shape: the state shape the system expects, with None for any size; checked before a solve.
    dtype:       the floating dtype the system expects; checked before a solve.
    """

    def __init__(self, evaluate: Evaluate, num_layers: int, *, jvp: Jvp | None = None,
                 mixing: Tensor | Callable[[slice, Tensor], Tensor] | None = None, stream_dim: int | None = None,
                 scales: Tensor | None = None, state_shape: Sequence[int | None] | None = None,
                 dtype: torch.dtype | None = None):
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
        if mixing is not None and stream_dim is None:
            raise ValueError("mixing was given without stream_dim: say which state dim the matrices act on")
        if scales is not None and tuple(scales.shape) != (num_layers,):
            raise ValueError(f"scales must have shape ({num_layers},), got {tuple(scales.shape)}")
        self._evaluate = evaluate
        self.num_layers = num_layers
        self._jvp = jvp
        self.mixing = mixing
        self.stream_dim = stream_dim
        self.scales = scales
        self.state_shape = None if state_shape is None else tuple(state_shape)
        self.dtype = dtype

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def from_function(cls, fn: Callable[[object, Tensor], Tensor], params, **structure) -> "LayerSystem":
        """f_l(h) = fn(params_l, h), where params is a pytree (tensor, dict, tuple, ...) of tensors stacked on dim 0
        over the L layers. Layers are evaluated in parallel with torch.func.vmap."""
        leaves = pytree.tree_leaves(params)
        if not leaves or not all(isinstance(t, Tensor) for t in leaves):
            raise ValueError("params must be a tensor or a pytree of tensors stacked on dim 0 over layers")
        sizes = {t.shape[0] if t.ndim else None for t in leaves}
        if len(sizes) != 1 or None in sizes:
            raise ValueError(f"every params leaf must have the same leading (layer) dim, got sizes {sorted(map(str, sizes))}")
        batched = torch.func.vmap(fn)

        def evaluate(layers: slice, inputs: Tensor) -> Tensor:
            return batched(pytree.tree_map(lambda t: t[layers], params), inputs)

        structure.setdefault("dtype", leaves[0].dtype if leaves[0].is_floating_point() else None)
        return cls(evaluate, sizes.pop(), **structure)

    @classmethod
    def from_modules(cls, blocks: Sequence[nn.Module], **structure) -> "LayerSystem":
        """f_l = blocks[l]. The blocks must share one structure (same parameter and buffer names and shapes).

        Their parameters are stacked once, here, with torch.stack, so gradients flow back to the blocks: build the
        system inside the step you differentiate, and again after the weights change."""
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks is empty: give at least one module")
        names = [_state_signature(b) for b in blocks]
        for i, sig in enumerate(names[1:], start=1):
            if sig != names[0]:
                diff = sorted(set(sig) ^ set(names[0]))
                raise ValueError(f"blocks[{i}] does not have the structure of blocks[0]; differing entries: {diff[:6]}")
        params = {n: torch.stack([dict(b.named_parameters())[n] for b in blocks]) for n, _ in blocks[0].named_parameters()}
        buffers = {n: torch.stack([dict(b.named_buffers())[n] for b in blocks]) for n, _ in blocks[0].named_buffers()}
        base = copy.deepcopy(blocks[0]).to("meta")

        def call(p, b, x):
            return torch.func.functional_call(base, (p, b), (x,))

        batched = torch.func.vmap(call)

        def evaluate(layers: slice, inputs: Tensor) -> Tensor:
            return batched({n: t[layers] for n, t in params.items()}, {n: t[layers] for n, t in buffers.items()}, inputs)

        floating = [t for t in params.values() if t.is_floating_point()]
        structure.setdefault("dtype", floating[0].dtype if floating else None)
        return cls(evaluate, len(blocks), **structure)

    # -- evaluation ----------------------------------------------------------------------------------------------

    def evaluate(self, layers: slice, inputs: Tensor) -> Tensor:
        """f_l(inputs[i]) for the layers of the slice, in one batched call. inputs: (n, *S) -> (n, *S)."""
        try:
            out = self._evaluate(layers, inputs)
        except (RuntimeError, ValueError, IndexError) as err:
            raise ValueError(f"evaluating layers {layers.start + 1}..{layers.stop} on states of shape "
                             f"{tuple(inputs.shape[1:])} and dtype {inputs.dtype} failed; does the state fit the "
                             f"system? ({type(err).__name__}: {err})") from err
        if out.shape != inputs.shape:
            raise ValueError(f"the system's evaluate returned shape {tuple(out.shape)} for inputs of shape "
                             f"{tuple(inputs.shape)}: every layer must map a state to a state of the same shape")
        return out

    def jvp(self, layers: slice, inputs: Tensor, tangents: Tensor) -> tuple[Tensor, Tensor]:
        """(f_l(inputs_i), J_l(inputs_i) tangents_i) for the layers of the slice, batched."""
        if self._jvp is not None:
            return self._jvp(layers, inputs, tangents)
        # Forward-mode AD refuses inputs whose elements share memory (an expanded repeat guess): give it a copy.
        return torch.func.jvp(lambda x: self._evaluate(layers, x), (inputs.contiguous(),), (tangents,))

    def mixing_matrices(self, layers: slice, inputs: Tensor) -> Tensor:
        """The system's mixing matrices for the layers of the slice (input-dependent ones are computed here)."""
        if self.mixing is None:
            raise ValueError("this system provides no mixing matrices: pass them to Mixing(matrices, dim=...)")
        return self.mixing(layers, inputs) if callable(self.mixing) else self.mixing[layers]

    def sequential(self, h0: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        """The reference trace, one layer after another: (stop - start + 1, *S), h_start .. h_stop.

        With the defaults this is the whole trace h_0 .. h_L, (L+1, *S)."""
        stop = self.num_layers if stop is None else stop
        states = [h0]
        for layer in range(start, stop):
            states.append(self.evaluate(slice(layer, layer + 1), states[-1][None])[0])
        return torch.stack(states)

    # -- checks --------------------------------------------------------------------------------------------------

    def check_state(self, h: Tensor, name: str = "h0") -> None:
        """Refuse a state that cannot be solved, with a message naming the argument."""
        if not isinstance(h, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(h).__name__}")
        if not h.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {h.dtype}")
        if self.dtype is not None and h.dtype != self.dtype:
            raise TypeError(f"{name} has dtype {h.dtype}, but the system computes in {self.dtype}")
        if self.state_shape is not None and not _shape_matches(tuple(h.shape), self.state_shape):
            expected = "(" + ", ".join("*" if s is None else str(s) for s in self.state_shape) + ")"
            raise ValueError(f"{name} has shape {tuple(h.shape)}, but the system expects states of shape {expected}")
        if not torch.isfinite(h).all():
            bad = int((~torch.isfinite(h)).sum())
            raise ValueError(f"{name} has {bad} non-finite value(s) (inf or nan): refusing to solve")

    def __repr__(self) -> str:
        extras = [f"stream_dim={self.stream_dim}"] if self.mixing is not None else []
        extras += ["scales"] if self.scales is not None else []
        extras += [f"state_shape={self.state_shape}"] if self.state_shape is not None else []
        return f"LayerSystem(num_layers={self.num_layers}{''.join(', ' + e for e in extras)})"


def _state_signature(module: nn.Module) -> tuple:
    return tuple((n, tuple(t.shape), t.dtype) for n, t in (*module.named_parameters(), *module.named_buffers()))


def _shape_matches(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(e is None or s == e for s, e in zip(shape, expected))


def machine_tolerance(dtype: torch.dtype) -> float:
    """sqrt(eps) of the dtype: the relative residual under which a layer counts as exact to rounding."""
    return math.sqrt(torch.finfo(dtype).eps)
