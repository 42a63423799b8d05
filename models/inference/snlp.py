"""SNLP over a nanochat model: a sequential prefix of L - n_par blocks, then the last n_par blocks (optionally
fused M at a time into C = n_par / M chunks) solved in parallel by layersolve with a surrogate Newton correction.

    plan = snlp.Plan(n_par=8, jacobian=ls.Identity(), iters=2)
    out = snlp.forward(model, idx, plan)      # out.logits, out.result, out.stats
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import layersolve as ls

from ..nanochat.gpt import GPT
from ..nanochat.block import BlockWeights

INITS = {"repeat": ls.Repeat(), "one_step": ls.OneStep()}


@dataclass(frozen=True)
class Plan:
    """n_par: parallel tail length. jacobian: the surrogate. iters / tol: Newton iterations, or a tolerance on the
    relative residual. init: "repeat" (SNLP h0), "one_step" (batch_fwd), ls.Given(trace) (warm), or an
    ls.Learned predictor (preheat, see `fit_preheat`). damping: d in [0, 1]. fuse: M blocks per fused chunk
    (chunks = n_par / M; `chunks`, if given, must agree). on_divergence: "stop" or "sequential"."""

    n_par: int
    jacobian: ls.Jacobian = field(default_factory=ls.Identity)
    iters: int | None = 1
    tol: float | None = None
    init: object = "repeat"
    damping: float = 0.0
    fuse: int = 1
    chunks: int | None = None
    on_divergence: str = "stop"

    def check(self, model: GPT) -> None:
        L = model.config.n_layer
        if not isinstance(self.n_par, int) or not 1 <= self.n_par <= L:
            raise ValueError(f"Plan.n_par must be an int in [1, {L}] (the model's layers), got {self.n_par!r}")
        if not isinstance(self.fuse, int) or self.fuse < 1 or self.n_par % self.fuse:
            raise ValueError(f"Plan.fuse={self.fuse!r} must be a positive int that divides n_par={self.n_par}")
        if self.chunks is not None and self.chunks * self.fuse != self.n_par:
            raise ValueError(f"Plan.chunks={self.chunks} x fuse={self.fuse} must equal n_par={self.n_par}")
        if self.fuse > 1 and model.config.use_mhc:
            raise ValueError("Plan.fuse > 1 is not defined for mHC models (hyper-connections do not fuse)")
        if isinstance(self.init, str) and self.init not in INITS:
            raise ValueError(f"Plan.init must be one of {sorted(INITS)} or a layersolve guess, got {self.init!r}")

    def guess(self):
        return INITS[self.init] if isinstance(self.init, str) else self.init

    def solver(self) -> ls.Newton:
        return ls.Newton(jacobian=self.jacobian, damping=self.damping)


@dataclass
class Tail:
    """A forward's state at the start of the parallel tail: the prefix trace h_0 .. h_{L-n_par} and the tail's
    layer system."""

    prefix: list[torch.Tensor]
    system: ls.LayerSystem
    start: int

    def logits(self, model: GPT, trace: torch.Tensor, fuse: int) -> torch.Tensor:
        """Logits from the tail's trace (C+1, *state): the last state, and the backout state (the output of block
        n_layer // 2, or of the fused chunk that holds it)."""
        b = model.backout_layer
        backout = self.prefix[b] if b < len(self.prefix) else trace[-(-(b - self.start) // fuse)]
        return model.head(trace[-1], backout)


def tail_weights(model: GPT, plan: Plan) -> BlockWeights:
    """The tail's stacked (and fused) weights: built once per model and plan while the weights do not change and
    no gradient is needed; rebuilt (differentiably) otherwise."""
    start = model.config.n_layer - plan.n_par
    if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
        return model.tail_weights(start, plan.fuse)
    stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())
    cache = model.__dict__.setdefault("_snlp_weights", {})
    key = (plan.n_par, plan.fuse)
    if key not in cache or cache[key][0] != stamp:
        with torch.no_grad():
            cache[key] = (stamp, model.tail_weights(start, plan.fuse))
    return cache[key][1]


def prepare(model: GPT, idx: torch.Tensor, plan: Plan) -> Tail:
    """Embed, run the sequential prefix, and build the tail's layer system."""
    plan.check(model)
    emb = model.embed(idx)
    start = model.config.n_layer - plan.n_par
    prefix = model.trace(emb, start)
    system = model.layer_system(emb, start, plan.fuse, tail_weights(model, plan))
    return Tail(prefix, system, start)


@dataclass(frozen=True)
class Output:
    """What `forward` returns: the logits (B, T, vocab_size), and how the tail's solve ended (`result`, a
    layersolve `Result`; `result.ok` is False for a diverged or non-finite solve, whose logits are not the model's)
    with its `stats`."""

    logits: torch.Tensor
    result: ls.Result
    stats: ls.Stats


def forward(model: GPT, idx: torch.Tensor, plan: Plan, throw: bool = True,
            reference: torch.Tensor | None = None) -> Output:
    """The layer-parallel forward. `throw`: raise `ls.SolveError` when the solve fails (else report it in the
    output's `result`). `reference`: the tail's exact trace (from `sequential_trace`), to record errors per iterate
    in the stats."""
    tail = prepare(model, idx, plan)
    sol = ls.solve(tail.system, tail.prefix[-1], plan.solver(), iters=plan.iters, tol=plan.tol, init=plan.guess(),
                   reference=reference, on_divergence=plan.on_divergence, throw=throw)
    return Output(tail.logits(model, sol.trace, plan.fuse), sol.result, sol.stats)


def sequential_trace(model: GPT, idx: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's model run one layer (or fused chunk) after another: (logits, the tail's trace). For fuse = 1
    this is the model itself; for fused plans it is the fused model, the reference its solves converge to."""
    tail = prepare(model, idx, plan)
    trace = tail.system.sequential(tail.prefix[-1])
    return tail.logits(model, trace, plan.fuse), trace


def fit_preheat(model: GPT, batches, plan: Plan, rank: int = 32) -> ls.Learned:
    """SNLP's preheat: a rank-`rank` affine predictor of every tail state from the tail's first state, per token,
    fitted on the exact tail traces of calibration batches (token tensors (B, T))."""
    starts, states = [], []
    with torch.no_grad():
        for idx in batches:
            _, trace = sequential_trace(model, idx, plan)
            width = trace.shape[-1]
            starts.append(trace[0].reshape(-1, width))
            states.append(trace[1:].reshape(trace.shape[0] - 1, -1, width))
    return ls.Learned.fit(torch.cat(starts), torch.cat(states, dim=1), rank)
