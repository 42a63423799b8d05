"""KV-cache decoding, sequential or SNLP, and `generate`.

A `Decoder` feeds tokens (a prompt, then one token at a time) through the model, keeping each unit's keys and
values: a unit is a block of the sequential prefix or suffix, or a block (or fused chunk) of the parallel segment.
With a plan, each step solves the segment with K Newton iterations over its units, each attending to its own cache;
then each unit's keys and values for the new tokens are computed from that unit's input in the final iterate, and
the suffix runs from the segment's final state, so later tokens see a cache consistent with the trace that produced
the output. With K = n_par the tokens are exactly those of sequential decoding.

With `init="warm"` a step's solve starts from the previous step's final trace at its last token, repeated over the
new tokens (the prompt step, which has no previous trace, starts from repeat): consecutive tokens' states are close,
so the guess is better than repeating h_start.

Decoding returns tokens, never a graph, so the decoders (this one, speculative.py's, ranks.py's) enter
`torch.inference_mode()` themselves, whatever the caller's context: under `no_grad` alone every step would pay
autograd's version counting and view tracking.
"""

from __future__ import annotations

import torch

import layersolve as ls

from ..nanochat.block import KVCache
from ..nanochat.gpt import GPT
from .snlp import WARM, Plan, prepare


class Decoder:
    """Feeds token batches (B, T) through `model`, sequentially (plan=None) or with SNLP over the plan's segment."""

    def __init__(self, model: GPT, plan: Plan | None = None, capacity: int | None = None, static: bool = False):
        """capacity: the most tokens fed in all (default the model's sequence_len). static: caches of fixed shape
        (see KVCache): every step attends to the whole capacity under a mask, so that a model with compiled blocks
        (GPT.compile_blocks) compiles a step once and on a GPU replays it as a CUDA graph; eager, it only costs."""
        self.model, self.plan, self.static = model, plan, static
        L = model.config.n_layer
        if plan is not None:
            plan.check(model)
        self.capacity = capacity or model.config.sequence_len
        self.position = 0
        self.previous = None  # the last token's normed embedding, for the next token's smear
        segment = range(L, L) if plan is None else plan.segment(L)
        # one cache per part, a unit a block (a fused chunk in the segment), numbered from the part's first block
        self.prefix = KVCache(segment.start, self.capacity, static=static)
        self.segment = None if plan is None else KVCache(plan.n_par // plan.fuse, self.capacity, static=static)
        self.suffix = KVCache(L - segment.stop, self.capacity, static=static) if segment.stop < L else None
        self.stats: list[ls.Stats] = []
        self.results: list[ls.Result] = []  # how each step's solve ended
        self.last_trace = None  # with init="warm": the previous step's final tail trace at its last token
        self.last_prefix: list[torch.Tensor] = []  # with a plan: the last step's prefix trace

    @torch.inference_mode()
    def step(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) for the tokens idx (B, T) that follow everything fed so far."""
        model = self.model
        if self.position + idx.shape[1] > self.capacity:
            raise ValueError(f"decoding past the cache capacity of {self.capacity} tokens")
        emb = model.embed(idx, position=self.position, previous=self.previous)
        if self.static and self.prefix.k is None:
            self._allocate(idx.shape[0], emb.x0)
        if self.plan is None:
            trace = model.trace(emb, cache=self.prefix)
            logits = model.head(trace[-1], trace[model.backout_layer])
        else:
            segment = prepare(model, emb, self.plan, self.prefix, self.segment, self.suffix)
            sol = segment.solve(init=self._warm_guess(idx.shape[1]))
            self.stats.append(sol.stats)
            self.results.append(sol.result)
            segment.system.store_kv(sol.trace, self._final_units(sol))
            if self.plan.init == WARM:
                self.last_trace = sol.trace[..., -1:, :]  # (C+1, *state) at the last token: T is dim -2
            logits = segment.logits(sol.trace)  # the suffix stores its keys and values at the final iterate
            self.last_prefix = segment.prefix  # h_0 .. h_s of these tokens (what speculative decoding shares)
        self.position += idx.shape[1]
        self.previous = emb.last_embedding
        return logits

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, max_new: int, temperature: float = 0.0, top_k: int | None = None,
                 seed: int = 0) -> torch.Tensor:
        """New tokens (B, max_new) after prompt (B, T), the first thing fed to this decoder."""
        if max_new < 0:
            raise ValueError(f"max_new must be >= 0, got {max_new}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.model.check_tokens(prompt)
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
        logits = self.step(prompt)[:, -1]
        out = []
        for _ in range(max_new):
            out.append(sample(logits, temperature, top_k, generator))
            logits = self.step(out[-1][:, None])[:, -1]
        return torch.stack(out, dim=1) if out else prompt.new_zeros(prompt.shape[0], 0)

    def _allocate(self, batch: int, x0: torch.Tensor) -> None:
        """Static caches before the first step: a segment unit of a fused plan is a wide block with `fuse` times the
        key / value heads."""
        cfg = self.model.config
        for cache, fuse in ((self.prefix, 1), (self.segment, None if self.plan is None else self.plan.fuse),
                            (self.suffix, 1)):
            if cache is not None:
                cache.allocate(batch, fuse * cfg.n_kv_head, cfg.head_dim, x0.dtype, x0.device)

    def _final_units(self, sol: ls.Solution) -> int:
        """How many leading tail units the solve's last evaluation saw at their final inputs, so that the keys and
        values it wrote are already the final iterate's: all of them when that evaluation was at the final iterate
        (a tolerance is checked there; a sequential fallback evaluates its layers at their final inputs), else the
        first K after K iterations, whose inputs were exact by finite termination (up to rounding)."""
        units = self.segment.units
        if self.plan.tol is not None or sol.stats.fallback_layers:
            return units
        return min(sol.stats.iterations, units)

    def _warm_guess(self, tokens: int):
        """The warm initial guess for `tokens` new tokens, or None for the plan's own guess."""
        if self.plan.init != WARM:
            return None
        if self.last_trace is None:
            return ls.Repeat()
        return ls.Given(self.last_trace.expand(*self.last_trace.shape[:-2], tokens, self.last_trace.shape[-1]))


def distribution(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """Next-token probabilities (B, V) in float32 from last-position logits (B, V): one-hot at the argmax at
    temperature 0, else the softmax at the temperature over the top_k largest logits (all when top_k is 0 or None)."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # in float64: a huge temperature (1e308) is inf in float32, and -inf / inf at the top-k cut would be NaN
    return torch.softmax(logits.double() / temperature, dim=-1).float()


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V): argmax at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(distribution(logits, temperature, top_k), 1, generator=generator)[:, 0]


def generate(model: GPT, prompt: torch.Tensor, max_new: int, plan: Plan | None = None, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0) -> torch.Tensor:
    """New tokens (B, max_new) after prompt (B, T), with KV caches; sequential (plan=None) or SNLP."""
    model.check_tokens(prompt)
    return Decoder(model, plan, capacity=prompt.shape[1] + max(max_new, 0)).generate(prompt, max_new, temperature,
                                                                                      top_k, seed)
