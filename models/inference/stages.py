"""The stage-level system of a nanochat model split by layers into P contiguous stages of M = L / P blocks, as
pipeline parallelism splits it across devices: x_c = F_c(x_{c-1}), c = 1..P, with F_c the stage's blocks run in
order, F_c = f_{cM} o ... o f_{(c-1)M+1}, and x_0 the embedding.

layersolve solves it with stage-level surrogates exactly as it solves the block-level system. With the identity
(IDN) the update is x_c^{k+1} = F_c(x_{c-1}^k) + (x_{c-1}^{k+1} - x_{c-1}^k): the change of each stage's input is
the sum of the stage residuals before it, an exclusive scan over stages, and P iterations reproduce the sequential
trace (finite termination over stages). In one process this is the reference for a multi-process runner, where
each rank evaluates one F_c and the scan runs over ranks; here the stages are evaluated one after another.

    system = StageSystem(model, model.embed(idx), stages=4)
    sol = ls.solve(system, system.h0, ls.Newton(jacobian=ls.Identity()), iters=1)
    logits = system.logits(sol.trace)
"""

from __future__ import annotations

import torch

import layersolve as ls

from ..nanochat.gpt import GPT, Embedded


class StageSystem(ls.LayerSystem):
    """x_c = F_c(x_{c-1}) over the P stages of `model` on the embedded tokens `emb`; the system's layer c - 1 is
    stage c (blocks (c-1)M .. cM - 1, 0-based)."""

    def __init__(self, model: GPT, emb: Embedded, stages: int):
        L = model.config.n_layer
        if not isinstance(stages, int) or stages < 1 or L % stages:
            divisors = [p for p in range(1, L + 1) if L % p == 0]
            raise ValueError(f"stages={stages!r} must divide the model's {L} layers into equal stages: one of "
                             f"{divisors}")
        self.model, self.emb, self.size = model, emb, L // stages
        self.ctx = emb.context()
        x0 = emb.x0
        super().__init__(self._outputs, stages, scales=torch.ones(stages, dtype=x0.dtype, device=x0.device),
                         state_shape=tuple(x0.shape), dtype=x0.dtype)

    @property
    def h0(self) -> torch.Tensor:
        """x_0: the embedding, the fixed input of stage 1."""
        return self.emb.x0

    def blocks(self, stage: int) -> range:
        """The blocks (0-based) of stage `stage` (0-based)."""
        return range(stage * self.size, (stage + 1) * self.size)

    def run(self, stage: int, h: torch.Tensor, stop: int | None = None) -> torch.Tensor:
        """F_{stage+1}(h): the stage's blocks in order (only those before block `stop` when given)."""
        for i in self.blocks(stage):
            if stop is not None and i >= stop:
                break
            h = self.model.block(i, h, self.emb, ctx=self.ctx)
        return h

    def _outputs(self, stages: slice, inputs: torch.Tensor) -> torch.Tensor:
        first = stages.indices(self.num_layers)[0]
        return torch.stack([self.run(first + i, h) for i, h in enumerate(inputs)])

    def logits(self, trace: torch.Tensor) -> torch.Tensor:
        """Logits from a stage trace (P+1, *state): the last state, and the backout state (the output of block
        L // 2 + 1, inside a stage unless M divides it) run from its stage's input in the trace."""
        b = self.model.backout_layer  # trace index in blocks: h_b is the output of block b (1-based)
        stage, offset = divmod(b, self.size)
        backout = trace[stage] if offset == 0 else self.run(stage, trace[stage], stop=b)
        return self.model.head(trace[-1], backout)
