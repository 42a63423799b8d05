"""The stage-level system of a nanochat model split by layers into P contiguous stages of M = L / P blocks, as
pipeline parallelism splits it across devices: x_c = F_c(x_{c-1}), c = 1..P, with F_c the stage's blocks run in
order, F_c = f_{cM} o ... o f_{(c-1)M+1}, and x_0 the embedding.

layersolve solves it with stage-level surrogates exactly as it solves the block-level system. With the identity
(IDN) the update is x_c^{k+1} = F_c(x_{c-1}^k) + (x_{c-1}^{k+1} - x_{c-1}^k): the change of each stage's input is
the sum of the stage residuals before it, an exclusive scan over stages, and P iterations reproduce the sequential
trace (finite termination over stages). In one process this is the reference for the multi-process runner
(ranks.py), where each rank evaluates one F_c and the scan runs over ranks; here the stages run one after another.

The states inside a stage (the inputs of its blocks after the first) are not in the stage trace. At the final
iterate they are the stage's last evaluation moved by the surrogate's correction of its input, g (x_{c-1}^K -
x_{c-1}^{K-1}), with g = 1 for IDN and 0 for Jacobi: the same correction the block-level solve would give them,
since inside a stage each block was evaluated at its predecessor's output (residual 0). The backout state (the
output of block L // 2 + 1) and a decoding stage's cached keys and values come from these states.

    system = StageSystem(model, model.embed(idx), stages=4)
    sol = ls.solve(system, system.h0, ls.Newton(jacobian=ls.Identity()), iters=1)
    logits = system.logits(sol.trace, previous, gain=1.0)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import layersolve as ls

from ..nanochat.block import BlockWeights, Context, KVCache, block_kv
from ..nanochat.gpt import GPT, Embedded, few_rows

GAINS = {ls.Identity: 1.0, ls.Zero: 0.0}  # the stage-level surrogates that act on a state as a scalar


def surrogate_gain(jacobian: ls.Jacobian) -> float:
    """g of a surrogate J~ = g I: how the correction of a stage's input moves its states."""
    for kind, gain in GAINS.items():
        if isinstance(jacobian, kind):
            return gain
    raise ValueError(f"jacobian={jacobian!r}: stages are corrected by a scalar surrogate, one of "
                     f"{[kind.__name__ for kind in GAINS]}")


def split(n_layer: int, stages: int) -> int:
    """M = n_layer / stages, the blocks of a stage; an error naming the possible counts when it does not divide."""
    if not isinstance(stages, int) or isinstance(stages, bool) or stages < 1 or n_layer % stages:
        divisors = [p for p in range(1, n_layer + 1) if n_layer % p == 0]
        raise ValueError(f"stages={stages!r} must divide the model's {n_layer} layers into equal stages: one of "
                         f"{divisors}")
    return n_layer // stages


@dataclass(frozen=True)
class Stage:
    """Stage `index` (0-based) of a nanochat `model` split into stages of `size` blocks: blocks index*size ..
    (index+1)*size-1. Its context and KV cache cover only its own blocks (unit j is block first + j). What a rank
    of ranks.py asks of its stage (HFStage is the same for Hugging Face models)."""

    model: GPT
    index: int
    size: int

    @property
    def blocks(self) -> range:
        return range(self.index * self.size, (self.index + 1) * self.size)

    # -- the tokens' side: rank 0 embeds, the others rebuild what their blocks need around the x0 it sends ----------

    def embed(self, idx: torch.Tensor, position: int, previous: torch.Tensor | None) -> Embedded:
        return self.model.embed(idx, position, previous, layers=self.blocks)

    def embedded(self, x0: torch.Tensor, idx: torch.Tensor, position: int) -> Embedded:
        return self.model.embedded(x0, idx, position, self.blocks)

    def context(self, emb: Embedded) -> Context:
        return emb.context()

    def state_shape(self, batch: int, tokens: int) -> tuple[int, ...]:
        cfg = self.model.config
        return (batch, *((cfg.mhc_num_streams,) if cfg.use_mhc else ()), tokens, cfg.n_embd)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.resid_lambdas.dtype

    @property
    def max_tokens(self) -> int:
        return self.model.rotary_len

    def check_tokens(self, idx: torch.Tensor) -> None:
        self.model.check_tokens(idx)

    # -- the stage's blocks ---------------------------------------------------------------------------------------

    def chain(self, h: torch.Tensor, ctx: Context, cache: KVCache | None = None,
              stop: int | None = None) -> list[torch.Tensor]:
        """The stage's states from its input h: [h, the output of its first block, ..., its output], or only the
        first `stop` + 1 of them. With a cache, each block attends to its cached keys and stores these tokens'."""
        states, units = [h], self._units(few_rows(h))
        for j, i in enumerate(self.blocks[:stop]):
            states.append(self.model.block(i, states[-1], None, cache, ctx, unit=j, weights=units[j]))
        return states

    def keys_values(self, inputs: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (size, B, KV, T, hd) the stage's blocks compute from their inputs (size, *state), in
        one batched call over the stacked weights."""
        return block_kv(self._stacked(few_rows(inputs[0])), inputs, ctx.select(slice(0, self.size)))

    def _stacked(self, vectors: bool) -> BlockWeights:
        return self.model.block_weights(slice(self.blocks.start, self.blocks.stop), vectors)

    def _units(self, vectors: bool) -> list[BlockWeights]:
        """Each block's weights as views of the stage's stack, which `keys_values` reads: one copy of the stage in
        memory, not two (with a second copy, a decoding step took 22 ms instead of 17 at L24 D256, most likely in
        cache misses: each rank's stage evaluation slowed from about 12 ms to 15)."""
        stacked = self._stacked(vectors)
        return self.model.prepared.get(("stage units", self.blocks.start, self.blocks.stop, vectors),
                                       lambda: [stacked[j:j + 1] for j in range(self.size)])

    # -- the head side --------------------------------------------------------------------------------------------

    def head(self, last: torch.Tensor, backout: torch.Tensor | None) -> torch.Tensor:
        return self.model.head(last, backout)

    def backout_source(self) -> tuple[int, int] | None:
        """Where the backout state h_b lies in a split into stages of this size: (the stage, its index in that
        stage's chain, 1 .. size; size is the stage's output, a state of the stage trace); (0, 0) for b = 0."""
        b = self.model.backout_layer
        if b == 0:
            return 0, 0
        stage = (b - 1) // self.size
        return stage, b - stage * self.size


@dataclass(frozen=True)
class HFStage:
    """Stage `index` of a Hugging Face model split into stages of `size` decoder layers, as `Stage` is for
    nanochat: `model` is an HFModel of the stage's layers alone (hf.load_stage; layer j is layer index*size + j).
    These models blend no x0 into their layers and have no backout state."""

    model: object  # models.hf.HFModel
    index: int
    size: int

    def embed(self, idx: torch.Tensor, position: int, previous=None):
        return self.model.embed(idx, position)

    def embedded(self, x0: torch.Tensor, idx: torch.Tensor, position: int):
        return self.model.embedded(x0, position)

    def context(self, emb):
        return emb

    def state_shape(self, batch: int, tokens: int) -> tuple[int, ...]:
        return batch, tokens, self.model.lm.config.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.lm.dtype

    @property
    def max_tokens(self) -> int:
        return self.model.config.sequence_len

    def check_tokens(self, idx: torch.Tensor) -> None:
        self.model.check_tokens(idx)

    def chain(self, h: torch.Tensor, emb, cache: KVCache | None = None, stop: int | None = None) -> list[torch.Tensor]:
        return self.model.trace(emb, stop, cache, state=h)

    def keys_values(self, inputs: torch.Tensor, emb) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.layers.keys_values(0, inputs, self.model.layer_inputs(emb, 0, self.size))

    def head(self, last: torch.Tensor, backout=None) -> torch.Tensor:
        return self.model.head(last)

    def backout_source(self) -> None:
        return None


def inside(source: tuple[int, int] | None, size: int) -> bool:
    """Whether a backout source lies strictly inside its stage, not in the stage trace."""
    return source is not None and 0 < source[1] < size


class StageSystem(ls.LayerSystem):
    """x_c = F_c(x_{c-1}) over the P stages of `model` on the embedded tokens `emb`; the system's layer c - 1 is
    stage c."""

    def __init__(self, model: GPT, emb: Embedded, stages: int):
        size = split(model.config.n_layer, stages)
        self.model, self.emb = model, emb
        self.stages = [Stage(model, c, size) for c in range(stages)]
        self.contexts = [emb.context(stage.blocks.start) for stage in self.stages]
        x0 = emb.x0
        super().__init__(self._outputs, stages, scales=torch.ones(stages, dtype=x0.dtype, device=x0.device),
                         state_shape=tuple(x0.shape), dtype=x0.dtype)

    @property
    def h0(self) -> torch.Tensor:
        """x_0: the embedding, the fixed input of stage 1."""
        return self.emb.x0

    def chain(self, stage: int, h: torch.Tensor, stop: int | None = None) -> list[torch.Tensor]:
        """Stage `stage`'s (0-based) states from its input h (see Stage.chain)."""
        return self.stages[stage].chain(h, self.contexts[stage], stop=stop)

    def _outputs(self, stages: slice, inputs: torch.Tensor) -> torch.Tensor:
        first = stages.indices(self.num_layers)[0]
        return torch.stack([self.chain(first + i, h)[-1] for i, h in enumerate(inputs)])

    def logits(self, trace: torch.Tensor, previous: torch.Tensor | None = None, gain: float = 1.0) -> torch.Tensor:
        """Logits from a stage trace x^K (P+1, *state): its last state, and the backout state. `previous`: x^{K-1},
        the iterate the last evaluation saw (default: x^K itself, as after convergence); a backout state inside a
        stage is that evaluation's, moved by gain * (x^K - x^{K-1}) of its stage's input."""
        previous = trace if previous is None else previous
        size = self.stages[0].size
        c, index = self.stages[0].backout_source()
        if inside((c, index), size):
            backout = self.chain(c, previous[c], stop=index)[-1] + gain * (trace[c] - previous[c])
        else:
            backout = trace[c + index // size]
        return self.model.head(trace[-1], backout)
