"""KV-cache decoding, sequential or SNLP, and `generate`.

A `Decoder` feeds tokens (a prompt, then one token at a time) through the model, keeping each unit's keys and
values: a unit is a block of the sequential prefix, or a block (or fused chunk) of the parallel tail. With a plan,
each step solves the tail with K Newton iterations over the tail's units, each attending to its own cache; then each
unit's keys and values for the new tokens are computed from that unit's input in the final iterate, so later tokens
see a cache consistent with the trace that produced the output. With K = n_par the tokens are exactly those of
sequential decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

import layersolve as ls

from ..nanochat.gpt import GPT
from ..nanochat.block import block_forward, block_kv
from .snlp import Plan, Tail, tail_weights


@dataclass
class Cache:
    """Keys and values of n units: (n, B, KV, capacity, hd) each; the first `length` positions are filled."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None

    def past(self, units: slice, length: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.k is None or length == 0:
            return None, None
        return self.k[units, :, :, :length], self.v[units, :, :, :length]

    def write(self, units: slice, position: int, k: torch.Tensor, v: torch.Tensor, capacity: int, count: int) -> None:
        if self.k is None:  # allocated on first write, when the head counts and dtype are known
            shape = (count, k.shape[1], k.shape[2], capacity, k.shape[4])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        self.k[units, :, :, position:position + k.shape[3]] = k
        self.v[units, :, :, position:position + v.shape[3]] = v


class Decoder:
    """Feeds token batches (B, T) through `model`, sequentially (plan=None) or with SNLP over the plan's tail."""

    def __init__(self, model: GPT, plan: Plan | None = None, capacity: int | None = None):
        self.model, self.plan = model, plan
        cfg = model.config
        if plan is not None:
            plan.check(model)
        self.start = cfg.n_layer if plan is None else cfg.n_layer - plan.n_par
        self.capacity = capacity or cfg.sequence_len
        self.position = 0
        self.previous = None  # the last token's normed embedding, for the next token's smear
        self.prefix, self.tail = Cache(), Cache()
        self.stats: list[ls.Stats] = []

    @torch.no_grad()
    def step(self, idx: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) for the tokens idx (B, T) that follow everything fed so far."""
        model, p = self.model, self.position
        if p + idx.shape[1] > self.capacity:
            raise ValueError(f"decoding past the cache capacity of {self.capacity} tokens")
        emb = model.embed(idx, position=p, previous=self.previous)
        trace = [emb.x0]
        for i in range(self.start):
            units = slice(i, i + 1)
            past_k, past_v = self.prefix.past(units, p)
            out = block_forward(model.block_weights(units), trace[-1][None], emb.context(units, past_k, past_v))
            self.prefix.write(units, p, out.k, out.v, self.capacity, self.start)
            trace.append(out.out[0])
        if self.plan is None:
            logits = model.head(trace[-1], trace[model.backout_layer])
        else:
            logits = self._solve_tail(emb, trace)
        self.position += idx.shape[1]
        self.previous = emb.last_embedding
        return logits

    def _solve_tail(self, emb, prefix: list[torch.Tensor]) -> torch.Tensor:
        model, plan, p = self.model, self.plan, self.position
        weights = tail_weights(model, plan)

        def past(units: slice):
            return self.tail.past(units, p)

        system = model.layer_system(emb, self.start, plan.fuse, weights, past)
        sol = ls.solve(system, prefix[-1], plan.solver(), iters=plan.iters, tol=plan.tol, init=plan.guess(),
                       on_divergence=plan.on_divergence)
        self.stats.append(sol.stats)
        units = slice(0, system.num_layers)
        context = model.tail_context(emb, self.start, plan.fuse, past)
        k, v = block_kv(weights, sol.trace[:-1], context(units))  # from each unit's input in the final iterate
        self.tail.write(units, p, k, v, self.capacity, system.num_layers)
        return Tail(prefix, system, self.start).logits(model, sol.trace, plan.fuse)


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> torch.Tensor:
    """Next tokens (B,) from last-position logits (B, V): argmax at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate(model: GPT, prompt: torch.Tensor, max_new: int, plan: Plan | None = None, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0) -> torch.Tensor:
    """New tokens (B, max_new) after prompt (B, T), with KV caches; sequential (plan=None) or SNLP."""
    if max_new < 0:
        raise ValueError(f"max_new must be >= 0, got {max_new}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    model.check_tokens(prompt)
    decoder = Decoder(model, plan, capacity=prompt.shape[1] + max_new)
    generator = torch.Generator(device=prompt.device).manual_seed(seed)
    logits = decoder.step(prompt)[:, -1]
    out = []
    for _ in range(max_new):
        out.append(sample(logits, temperature, top_k, generator))
        logits = decoder.step(out[-1][:, None])[:, -1]
    return torch.stack(out, dim=1) if out else prompt.new_zeros(prompt.shape[0], 0)
