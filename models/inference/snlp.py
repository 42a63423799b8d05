"""SNLP over a nanochat model: a sequential prefix of L - n_par blocks, then the last n_par blocks (optionally
fused M at a time into C = n_par / M chunks) solved in parallel by layersolve with a surrogate Newton correction.

    plan = snlp.Plan(n_par=8, jacobian=ls.Identity(), iters=2)
    out = snlp.forward(model, idx, plan)      # out.logits, out.result, out.stats
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import layersolve as ls

from ..nanochat.block import KVCache
from ..nanochat.gpt import GPT, Embedded
from ..nanochat.system import BlockSystem

INITS = {"repeat": ls.Repeat(), "one_step": ls.OneStep()}
WARM = "warm"  # decoding only: the previous token's final trace (the published code's default for generation)


@dataclass(frozen=True)
class Plan:
    """n_par: parallel tail length. jacobian: the surrogate. iters / tol: Newton iterations, or a tolerance on the
    relative residual. init: "repeat" (SNLP h0), "one_step" (batch_fwd), ls.Given(trace), an ls.Learned predictor
    (preheat, see `fit_preheat`), or for decoding "warm" (each step starts from the previous token's final trace;
    the prompt step from repeat). damping: d in [0, 1]. fuse: M blocks per fused chunk
    (C = n_par / M chunks). on_divergence: "stop" or "sequential"."""

    n_par: int
    jacobian: ls.Jacobian = field(default_factory=ls.Identity)
    iters: int | None = 1
    tol: float | None = None
    init: object = "repeat"
    damping: float = 0.0
    fuse: int = 1
    on_divergence: str = "stop"

    def check(self, model: GPT) -> None:
        L = model.config.n_layer
        if not isinstance(self.n_par, int) or not 1 <= self.n_par <= L:
            raise ValueError(f"Plan.n_par must be an int in [1, {L}] (the model's layers), got {self.n_par!r}")
        if not isinstance(self.fuse, int) or self.fuse < 1 or self.n_par % self.fuse:
            raise ValueError(f"Plan.fuse={self.fuse!r} must be a positive int that divides n_par={self.n_par}")
        if self.fuse > 1 and model.config.use_mhc:
            raise ValueError("Plan.fuse > 1 is not defined for mHC models (hyper-connections do not fuse)")
        if isinstance(self.init, str) and self.init not in (*INITS, WARM):
            raise ValueError(f"Plan.init must be one of {sorted([*INITS, WARM])} or a layersolve guess, got "
                             f"{self.init!r}")

    def guess(self):
        if self.init == WARM:
            raise ValueError("Plan.init='warm' starts each decoding step from the previous token's trace: it is for "
                             "decoding (Decoder, generate), and a forward has no previous token")
        return INITS[self.init] if isinstance(self.init, str) else self.init

    def solver(self) -> ls.Newton:
        return ls.Newton(jacobian=self.jacobian, damping=self.damping)


@dataclass
class Tail:
    """A forward at the start of its parallel tail: the plan, the prefix trace h_0 .. h_start (start = L - n_par),
    and the tail's layer system."""

    plan: Plan
    prefix: list[torch.Tensor]
    system: BlockSystem

    def solve(self, reference: torch.Tensor | None = None, throw: bool = True, init=None) -> ls.Solution:
        """The plan's solve of the tail from the prefix's last state; `init` replaces the plan's initial guess."""
        plan = self.plan
        return ls.solve(self.system, self.prefix[-1], plan.solver(), iters=plan.iters, tol=plan.tol,
                        init=plan.guess() if init is None else init, reference=reference,
                        on_divergence=plan.on_divergence, throw=throw)

    def logits(self, model: GPT, trace: torch.Tensor) -> torch.Tensor:
        """Logits from the tail's trace (C+1, *state): the last state, and the backout state, the output of block
        n_layer // 2 (trace index b = backout_layer), or of the fused chunk that holds it."""
        b, start = model.backout_layer, len(self.prefix) - 1
        backout = self.prefix[b] if b <= start else trace[(b - 1 - start) // self.plan.fuse + 1]
        return model.head(trace[-1], backout)


def prepare(model: GPT, emb: Embedded, plan: Plan, prefix_cache: KVCache | None = None,
            tail_cache: KVCache | None = None) -> Tail:
    """Run the sequential prefix over the embedded tokens and build the tail's layer system. With KV caches
    (decoding), the prefix's blocks and the tail's units attend to theirs, and the prefix's blocks store these
    tokens' keys and values."""
    plan.check(model)
    start = model.config.n_layer - plan.n_par
    prefix = model.trace(emb, start, prefix_cache)
    return Tail(plan, prefix, model.layer_system(emb, start, plan.fuse, past=tail_cache))


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
    tail = prepare(model, model.embed(idx), plan)
    sol = tail.solve(reference, throw)
    return Output(tail.logits(model, sol.trace), sol.result, sol.stats)


def sequential_trace(model: GPT, idx: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's model run one layer (or fused chunk) after another: (logits, the tail's trace). For fuse = 1
    this is the model itself; for fused plans it is the fused model, the reference its solves converge to."""
    tail = prepare(model, model.embed(idx), plan)
    trace = tail.system.sequential(tail.prefix[-1])
    return tail.logits(model, trace), trace


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
