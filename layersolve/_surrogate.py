"""How far a surrogate Jacobian is from the exact one: ||J_l - J~_l||_2 per layer, at the inputs of a trace.

The Newton error over depth propagates through E_l = J_l - J~_l (docs/math.md eq. (6)): a surrogate whose
mismatch has a small spectral norm keeps the error it passes on small, so this norm says in advance how fast a
strategy can converge on a model, without running a solve. It is estimated matrix-free, by power iteration on E_l^T E_l:
E_l u from one batched JVP of every layer minus the strategy's `LinearMap`, E_l^T v by reverse-mode autograd
through that same linear map u -> E_l u. Every layer is handled in one batched call per iteration.
"""

from __future__ import annotations

from typing import Callable

import torch

from ._recurrence import layer_norms
from ._system import LayerSystem
from .jacobians import Jacobian, Step, Work

Tensor = torch.Tensor


def surrogate_error(system: LayerSystem, trace: Tensor, jacobian: Jacobian, layers: slice | None = None,
                    iters: int = 20, seed: int = 0, relative: bool = False) -> Tensor:
    """Per-layer estimate of ||J_l - J~_l||_2 at the inputs h_{l-1} of `trace`, for the layers of the slice.

    system:   the layer system; its `jvp` gives J_l u.
    trace:    (L+1, *S) states h_0 .. h_L, e.g. `system.sequential(h0)`; layer l is linearized at h_{l-1}.
    jacobian: the strategy (ls.Identity(), ls.Zero(), ls.Scaled(), ls.Mixing(), ls.Diagonal(), ...) whose
              `linearize` gives J~_l at those inputs, as in a Newton step.
    layers:   0-based slice of layers (default all); slice(a, b) is f_{a+1} .. f_b.
    iters:    power iterations. Each costs one batched JVP and one reverse pass; the estimate is a lower bound
              that rises to the norm at a rate set by the gap between the two largest singular values.
    seed:     seeds the random starting vectors (and the probes of randomized strategies).
    relative: divide by the same power iteration's estimate of ||J_l||_2 (NaN where J_l = 0 and the mismatch is 0).

    Returns (n,) float64 on the CPU, detached. The transpose needs the system's evaluation (and its `jvp`) to be
    differentiable by reverse-mode autograd; a system that is not gets the autograd error, not a different estimate.
    """
    if not isinstance(jacobian, Jacobian):
        raise TypeError(f"jacobian must be a Jacobian strategy (ls.Identity(), ls.Zero(), ...), got {jacobian!r}")
    if not isinstance(iters, int) or isinstance(iters, bool) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    if not isinstance(trace, Tensor) or trace.ndim < 1 or trace.shape[0] != system.num_layers + 1:
        shape = tuple(trace.shape) if isinstance(trace, Tensor) else type(trace).__name__
        raise ValueError(f"trace must be the (L+1, *S) = ({system.num_layers + 1}, ...) states h_0 .. h_L of the "
                         f"system's {system.num_layers} layers, got {shape}")
    layers = _layer_slice(layers, system.num_layers)
    inputs = trace[layers.start:layers.stop].detach()
    system.check_state(inputs[0], f"trace[{layers.start}]")
    if not torch.isfinite(inputs).all():
        raise ValueError(f"trace has non-finite values (inf or nan) in the inputs h_{layers.start} .. "
                         f"h_{layers.stop - 1} of the layers: there is no Jacobian to compare there")
    jacobian.check(system, layers, inputs[0])

    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    step = Step(system, layers, inputs, system.evaluate(layers, inputs), Work(), generator)
    surrogate = jacobian.linearize(step)

    def exact(u: Tensor) -> Tensor:
        return system.jvp(layers, inputs, u)[1]

    start = torch.randn(inputs.shape, generator=generator, dtype=inputs.dtype, device=inputs.device)
    error = _spectral_norms(lambda u: exact(u) - surrogate.apply(u), start, iters)
    return error / _spectral_norms(exact, start, iters) if relative else error


def _layer_slice(layers: slice | None, num_layers: int) -> slice:
    """The slice with its bounds filled in, or a ValueError naming `layers` for a slice that is not a run of the
    system's layers (an out-of-range bound is refused, not clipped: a clipped slice estimates other layers)."""
    if layers is None:
        return slice(0, num_layers)
    if isinstance(layers, slice) and layers.step in (None, 1):
        start = 0 if layers.start is None else layers.start
        stop = num_layers if layers.stop is None else layers.stop
        if all(isinstance(b, int) and not isinstance(b, bool) for b in (start, stop)) \
                and 0 <= start < stop <= num_layers:
            return slice(start, stop)
    raise ValueError(f"layers must be a slice(start, stop) with 0 <= start < stop <= {num_layers} (0-based, "
                     f"step 1) or None for all layers, got {layers!r}")


def _spectral_norms(apply: Callable[[Tensor], Tensor], start: Tensor, iters: int) -> Tensor:
    """||A_l||_2 of every layer of a batched linear map A (n, *S) -> (n, *S), by power iteration on A^T A from
    `start`. A^T comes from autograd (the vjp of the linear map, the same at every point); the returned value is
    ||A v|| for the last unit iterate v, a lower bound on the norm."""
    _, transpose = torch.func.vjp(apply, torch.zeros_like(start))
    v = _unit(start)
    for _ in range(iters):
        v = _unit(transpose(apply(v))[0].detach())
    return layer_norms(apply(v)).cpu()


def _unit(x: Tensor) -> Tensor:
    """Each layer's vector scaled to norm 1. A layer whose vector vanished stays 0: A^T A v = 0 means A v = 0, so
    the estimate there is the norm, 0."""
    norms = layer_norms(x).to(x.dtype).reshape(-1, *(1,) * (x.ndim - 1))
    return x / norms.clamp_min(torch.finfo(x.dtype).tiny)
