"""What every Jacobian strategy sees and returns.

A strategy is a frozen dataclass of hyperparameters with two methods:
- `check(system, layers, state)`: refuse, before any work, what it cannot do (wrong matrix sizes, memory budget);
- `linearize(step) -> LinearMap`: the surrogate J~_l for the layers of the step, at the current iterate.
A new strategy is one new file that implements these; the driver never branches on the strategy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._recurrence import LinearMap, OperatorMap
from .._system import LayerSystem


@dataclass
class Work:
    """Counters of the work a solve does (mutable; one per segment)."""

    evaluations: int = 0
    jvps: int = 0
    depth: int = 0
    inner_iterations: int = 0


@dataclass(frozen=True)
class Step:
    """One Newton linearization point: the layers being solved, their inputs h_{l-1}^k (n, *S) and their
    evaluations f_l(h_{l-1}^k) (n, *S)."""

    system: LayerSystem
    layers: slice
    inputs: torch.Tensor
    outputs: torch.Tensor
    work: Work
    generator: torch.Generator

    @property
    def num_layers(self) -> int:
        return self.layers.stop - self.layers.start

    def jvp(self, tangents: torch.Tensor, layers: slice | None = None, inputs: torch.Tensor | None = None) -> torch.Tensor:
        """J_l tangents_l for every layer of the step (or of a sub-slice of it). Counted: one jvp per layer, and
        one step of depth per call (the layers of one call run in parallel)."""
        layers = self.layers if layers is None else layers
        inputs = self.inputs if inputs is None else inputs
        self.work.jvps += inputs.shape[0]
        self.work.depth += 1
        return self.system.jvp(layers, inputs, tangents)[1]

    def jvp_map(self) -> OperatorMap:
        """The exact J_l as a matrix-free map: all layers by one batched JVP, or one layer by its own JVP."""
        start = self.layers.start

        def one(i: int, v: torch.Tensor) -> torch.Tensor:
            return self.jvp(v[None], slice(start + i, start + i + 1), self.inputs[i:i + 1])[0]

        return OperatorMap(self.jvp, one)


class Jacobian:
    """Base of the strategies: no up-front checks by default."""

    def check(self, system: LayerSystem, layers: slice, state: torch.Tensor) -> None:
        return None

    def linearize(self, step: Step) -> LinearMap:
        raise NotImplementedError


def is_count(value) -> bool:
    """A positive int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
