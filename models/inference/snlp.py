"""SNLP over a model (nanochat's GPT or a Hugging Face model): a segment of n_par consecutive blocks [s, s + n_par)
(optionally fused M at a time into C = n_par / M chunks) solved in parallel by layersolve with a surrogate Newton
correction, between a sequential prefix (blocks 0 .. s - 1) and a sequential suffix (blocks s + n_par .. L - 1).
By default the segment is the tail (s = L - n_par, no suffix), SNLP's plan.

    plan = snlp.Plan(n_par=8, jacobian=ls.Identity(), iters=2)             # the last 8 blocks
    plan = snlp.Plan(n_par=8, iters=1, start=12)                           # blocks 12 .. 19, then 20 .. L - 1
    out = snlp.forward(model, idx, plan)      # out.logits, out.result, out.stats
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import layersolve as ls

from ..nanochat.block import KVCache, inference_unless_grad
from ..nanochat.gpt import GPT, Embedded
from ..nanochat.system import BlockSystem

INITS = {"repeat": ls.Repeat(), "one_step": ls.OneStep()}
WARM = "warm"  # decoding only: the previous token's final trace (the published code's default for generation)


@dataclass(frozen=True)
class Plan:
    """n_par: the parallel segment's length. start: its first block s (0-based), None for the tail
    (s = L - n_par). jacobian: the surrogate. iters / tol: Newton iterations, or a tolerance on the relative
    residual. init: "repeat" (SNLP h0), "one_step" (batch_fwd), ls.Given(trace), an ls.Learned predictor (preheat,
    see `fit_preheat`), or for decoding "warm" (each step starts from the previous token's final trace; the prompt
    step from repeat). damping: d in [0, 1]. fuse: M blocks per fused chunk (C = n_par / M chunks).
    on_divergence: "stop" or "sequential"."""

    n_par: int
    jacobian: ls.Jacobian = field(default_factory=ls.Identity)
    iters: int | None = 1
    tol: float | None = None
    init: object = "repeat"
    damping: float = 0.0
    fuse: int = 1
    on_divergence: str = "stop"
    start: int | None = None

    def segment(self, n_layer: int) -> range:
        """The blocks solved in parallel, s .. s + n_par - 1, of a model of n_layer blocks."""
        start = n_layer - self.n_par if self.start is None else self.start
        return range(start, start + self.n_par)

    def check(self, model: GPT) -> None:
        L = model.config.n_layer
        if not isinstance(self.n_par, int) or isinstance(self.n_par, bool) or not 1 <= self.n_par <= L:
            raise ValueError(f"Plan.n_par must be an int in [1, {L}] (the model's layers), got {self.n_par!r}")
        if self.start is not None and (not isinstance(self.start, int) or isinstance(self.start, bool)
                                       or not 0 <= self.start <= L - self.n_par):
            raise ValueError(f"Plan.start={self.start!r} with n_par={self.n_par}: the segment [start, start + n_par) "
                             f"must lie in the model's {L} layers, so start must be an int in [0, {L - self.n_par}]")
        if not isinstance(self.fuse, int) or self.fuse < 1 or self.n_par % self.fuse:
            raise ValueError(f"Plan.fuse={self.fuse!r} must be a positive int that divides n_par={self.n_par}")
        if self.fuse > 1 and model.config.use_mhc:
            raise ValueError("Plan.fuse > 1 is not defined for mHC models (hyper-connections do not fuse)")
        if isinstance(self.jacobian, ls.Mixing) and self.jacobian.matrices is None and not model.config.use_mhc:
            raise ValueError("the HCN surrogate (ls.Mixing) needs an mHC model (use_mhc=True: trained with --mhc); "
                             "this model has no hyper-connections: use IDN")
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
class Segment:
    """A forward at the start of its parallel segment [s, e): the plan, the embedded tokens, the prefix trace
    h_0 .. h_s, the segment's layer system, and (decoding) the KV cache of the suffix blocks e .. L - 1."""

    plan: Plan
    model: GPT
    emb: Embedded
    prefix: list[torch.Tensor]
    system: BlockSystem
    suffix_cache: KVCache | None = None

    def solve(self, reference: torch.Tensor | None = None, throw: bool = True, init=None) -> ls.Solution:
        """The plan's solve of the segment from the prefix's last state; `init` replaces the plan's initial guess."""
        plan = self.plan
        return ls.solve(self.system, self.prefix[-1], plan.solver(), iters=plan.iters, tol=plan.tol,
                        init=plan.guess() if init is None else init, reference=reference,
                        on_divergence=plan.on_divergence, throw=throw)

    def suffix(self, trace: torch.Tensor) -> list[torch.Tensor]:
        """h_e .. h_L: the suffix blocks run one after another from the segment's last state in `trace`
        (C+1, *state); with a cache, each stores these tokens' keys and values at that final iterate."""
        stop = self.plan.segment(self.model.config.n_layer).stop
        return self.model.trace(self.emb, cache=self.suffix_cache, start=stop, state=trace[-1])

    def logits(self, trace: torch.Tensor) -> torch.Tensor:
        """Logits from the segment's trace (C+1, *state), through the suffix: the last state, and nanochat's backout
        state h_b (b = backout_layer, the output of block L // 2), read from the prefix, from the fused chunk of
        the segment that outputs it, or from the suffix."""
        segment = self.plan.segment(self.model.config.n_layer)
        suffix = self.suffix(trace)
        b = self.model.backout_layer
        if b <= segment.start:
            backout = self.prefix[b]
        elif b <= segment.stop:
            backout = trace[(b - 1 - segment.start) // self.plan.fuse + 1]
        else:
            backout = suffix[b - segment.stop]
        return self.model.head(suffix[-1], backout)


def prepare(model: GPT, emb: Embedded, plan: Plan, prefix_cache: KVCache | None = None,
            segment_cache: KVCache | None = None, suffix_cache: KVCache | None = None) -> Segment:
    """Run the sequential prefix over the embedded tokens and build the segment's layer system. With KV caches
    (decoding: one per part, its units numbered from the part's first block), the prefix's blocks and the segment's
    units attend to theirs, and the prefix's blocks store these tokens' keys and values."""
    plan.check(model)
    segment = plan.segment(model.config.n_layer)
    prefix = model.trace(emb, segment.start, prefix_cache)
    system = model.layer_system(emb, segment.start, plan.fuse, past=segment_cache, stop=segment.stop)
    return Segment(plan, model, emb, prefix, system, suffix_cache)


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
    output's `result`). `reference`: the segment's exact trace (from `sequential_trace`), to record errors per
    iterate in the stats."""
    with inference_unless_grad():  # the caller's context stays: the head, outside, returns ordinary tensors
        segment = prepare(model, model.embed(idx), plan)
        sol = segment.solve(reference, throw=False)
    stats = sol.stats.clone()
    if throw and not sol.result.ok:
        raise ls.SolveError(sol.result, stats)
    return Output(segment.logits(sol.trace), sol.result, stats)


def sequential_trace(model: GPT, idx: torch.Tensor, plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's model run one layer (or fused chunk) after another: (logits, the segment's trace). For fuse = 1
    this is the model itself; for fused plans it is the fused model, the reference its solves converge to."""
    segment = prepare(model, model.embed(idx), plan)
    trace = segment.system.sequential(segment.prefix[-1])
    return segment.logits(trace), trace


def fit_preheat(model: GPT, batches, plan: Plan, rank: int = 32) -> ls.Learned:
    """SNLP's preheat: a rank-`rank` affine predictor of every segment state from the segment's first state, per
    token, fitted on the exact segment traces of calibration batches (token tensors (B, T))."""
    starts, states = [], []
    with torch.no_grad():
        for idx in batches:
            _, trace = sequential_trace(model, idx, plan)
            width = trace.shape[-1]
            starts.append(trace[0].reshape(-1, width))
            states.append(trace[1:].reshape(trace.shape[0] - 1, -1, width))
    return ls.Learned.fit(torch.cat(starts), torch.cat(states, dim=1), rank)
