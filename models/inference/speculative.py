"""Lossless self-speculative decoding (SNLP's SSD, with KV caches): the model's own SNLP forward drafts up to B
tokens, one at a time; the sequential forward verifies them in one pass over the new positions and accepts a
prefix. The output is the sequential model's: token for token when greedy, in distribution when sampling.

A round, from the last committed token t (fed to nothing yet) at position p:

    draft     B decoding steps of the plan (prefix blocks, the segment's K-iteration solve, suffix blocks) on t,
              d_1 .. d_{B-1}, each proposing the next token d_j from its distribution q_j;
    verify    the blocks from the segment's first, s, to the last run sequentially on the same B tokens, from the
              prefix states h_s the draft computed; their logits give the sequential model's p_j at every position
              at once;
    accept    d_j with probability min(1, p_j(d_j) / q_j(d_j)), in order; at the first rejection draw the token from
              norm(max(0, p_j - q_j)) instead and end the round (Leviathan et al. 2023, Chen et al. 2023). Greedy is
              the case of one-hot p and q: accept while the verifier's argmax agrees, else take its argmax.

Sharing and caches. The draft's prefix blocks compute exactly what the verifier's first s blocks compute (same
tokens, same inputs, exact caches), so the verifier does not run them: it only runs the L - s blocks from the
segment on over the B tokens, (L - s) / L of a sequential pass, and one cache serves both. The cache is one stack
of L units; the prefix's units are the draft's prefix cache, the suffix's its suffix cache, and without fusion the
segment's units are the draft's segment cache too (views of the same memory). The draft writes its approximate
segment and suffix keys and values at the drafted positions, and the verifier then overwrites them with the exact
ones. With fusion the draft's segment units are fused chunks of another shape: they keep their own cache, and
after each round get the keys and values of the exact chunk inputs (`BlockSystem.store_kv` on the verifier's
trace). So after every round each position up to the last committed
token holds exactly the keys and values of the sequential trace, in every cache. A rejection needs no copying:
the positions past the accepted tokens are overwritten by the next round, and only the write position, the smear
state (the last accepted token's embedding) and the warm guess (the exact trace at that token) are reset.

Why it is exact: the verifier's p_j are the sequential model's next-token distributions given the committed
tokens (exact caches, exact prefix states), and the accept / resample rule draws each committed token from p_j
whatever q_j is. The draft only decides how many tokens a round commits.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..nanochat.block import KVCache
from ..nanochat.gpt import GPT  # or a Hugging Face model (models.hf.HFModel): the same surface
from .decode import Decoder, distribution
from .snlp import WARM, Plan


@dataclass
class SpeculationStats:
    """rounds: draft-verify rounds; drafted: tokens proposed; accepted: proposals the verifier accepted; tokens:
    tokens committed (accepted, plus one drawn by the verifier at each rejection)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    accepted_lengths: list[int] = field(default_factory=list)  # tokens committed per round

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        """Tokens committed per round (at most B)."""
        return self.tokens / self.rounds if self.rounds else float("nan")


class SpeculativeDecoder:
    """Self-speculative decoding of one sequence: `plan` drafts, the sequential forward verifies."""

    def __init__(self, model: GPT, plan: Plan, capacity: int | None = None):
        plan.check(model)
        if plan.init not in ("repeat", WARM, "one_step"):
            raise ValueError(f"plan.init must be 'repeat', 'one_step' or 'warm' for drafting, got {plan.init!r}")
        self.model, self.plan = model, plan
        self.segment = plan.segment(model.config.n_layer)  # blocks s .. e - 1
        self.draft = Decoder(model, plan, capacity)
        self.capacity = self.draft.capacity
        self.cache = KVCache(model.config.n_layer, self.capacity)  # every block's units: the verifier's cache
        self.stats = SpeculationStats()

    def _share(self, device: torch.device) -> None:
        """Allocate the one cache and make the draft's prefix, suffix and (unfused) segment caches views of it."""
        cfg, (s, e) = self.model.config, (self.segment.start, self.segment.stop)
        self.cache.allocate(1, cfg.n_kv_head, cfg.head_dim, self.model.dtype, device)
        self.draft.prefix = self._view(0, s)
        if self.draft.suffix is not None:
            self.draft.suffix = self._view(e, cfg.n_layer)
        if self.plan.fuse == 1:
            self.draft.segment = self._view(s, e)

    def _view(self, first: int, stop: int) -> KVCache:
        """The one cache's units first .. stop - 1 (blocks), as a cache of their own (views of the same memory)."""
        return KVCache(stop - first, self.capacity, self.cache.k[first:stop], self.cache.v[first:stop])

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, max_new: int, draft_len: int = 4, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0) -> torch.Tensor:
        """New tokens (1, max_new) after prompt (1, T), the first thing fed to this decoder."""
        model = self.model
        _check(prompt, max_new, draft_len, temperature, top_k, self.capacity)
        model.check_tokens(prompt)
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
        self._share(prompt.device)
        # The prompt but its last token, exactly (all L blocks); the last token starts the first round.
        position, previous = 0, None
        if prompt.shape[1] > 1:
            emb = model.embed(prompt[:, :-1])
            model.trace(emb, cache=self.cache)
            position, previous = prompt.shape[1] - 1, emb.last_embedding
        last = prompt[:, -1:]  # (1, 1)
        out: list[int] = []
        while len(out) < max_new:
            committed, position, previous = self._round(last, position, previous,
                                                        min(draft_len, max_new - len(out)), temperature, top_k,
                                                        generator)
            out += committed
            last = torch.tensor([[committed[-1]]], device=prompt.device)
        return torch.tensor([out[:max_new]], dtype=prompt.dtype, device=prompt.device)

    def _round(self, last, position, previous, B, temperature, top_k, generator):
        """One draft-verify round from token `last` at `position`: the committed tokens, the next position and the
        smear state after them."""
        model, draft = self.model, self.draft
        draft.position, draft.previous = position, previous
        tokens, proposals, qs, starts, backouts, embeddings = [last], [], [], [], [], []
        for _ in range(B):
            logits = draft.step(tokens[-1])[:, -1]  # (1, V)
            q = distribution(logits, temperature, top_k)[0]  # (V,)
            proposal = _draw(q, generator)
            prefix = draft.last_prefix
            starts.append(prefix[-1])
            backouts.append(prefix[model.backout_layer] if model.backout_layer <= self.segment.start else None)
            embeddings.append(draft.previous)
            qs.append(q)
            proposals.append(proposal)
            tokens.append(torch.tensor([[proposal]], device=last.device))
        fed = torch.cat(tokens[:-1], dim=1)  # (1, B): t, d_1 .. d_{B-1}
        ps, states = self._verify(fed, position, previous, starts, backouts, temperature, top_k)
        committed, accepted = [], 0
        for proposal, p, q in zip(proposals, ps, qs):
            if accepts(float(torch.rand((), generator=generator, device=p.device)), p[proposal], q[proposal]):
                committed.append(proposal)
                accepted += 1
                continue
            committed.append(_draw(torch.clamp(p - q, min=0), generator))  # the residual, renormalized by _draw
            break
        # The positions that stand are those of t and of the committed tokens but the last: as many as committed.
        valid = len(committed)
        self._after(fed, position, previous, states, valid)
        self.stats.rounds += 1
        self.stats.drafted += B
        self.stats.accepted += accepted
        self.stats.tokens += valid
        self.stats.accepted_lengths.append(valid)
        return committed, position + valid, embeddings[valid - 1]

    def _verify(self, fed, position, previous, starts, backouts, temperature, top_k):
        """The sequential model's next-token distributions (B of them) after each fed token, running only the blocks
        from the segment on, from the draft's prefix states; and their exact states h_s .. h_L (of (1, .., B, D))."""
        model, L = self.model, self.model.config.n_layer
        emb = model.embed(fed, position=position, previous=previous)
        states = model.trace(emb, cache=self._view(self.segment.start, L), start=self.segment.start,
                             state=torch.cat(starts, dim=-2))  # (1, [S,] B, D) at h_s: T is dim -2
        b = model.backout_layer
        backout = torch.cat(backouts, dim=-2) if b <= self.segment.start else states[b - self.segment.start]
        logits = model.head(states[-1], backout)[0]  # (B, V)
        return [distribution(row[None], temperature, top_k)[0] for row in logits], states

    def _after(self, fed, position, previous, states, valid):
        """Make the draft's segment cache exact at the fed positions (fused chunks), and its warm guess the exact
        trace at the last standing token."""
        plan, draft = self.plan, self.draft
        # (C+1, 1, [S,] B, D): the exact inputs of the draft's segment units, and the segment's last state
        chunks = torch.stack(states[:plan.n_par + 1:plan.fuse])
        if plan.fuse > 1:
            emb = self.model.embed(fed, position=position, previous=previous)
            self.model.layer_system(emb, self.segment.start, plan.fuse, past=draft.segment,
                                    stop=self.segment.stop).store_kv(chunks, 0)
        if plan.init == WARM:
            draft.last_trace = chunks[..., valid - 1:valid, :]


def accepts(u: float, p: torch.Tensor, q: torch.Tensor) -> bool:
    """The acceptance rule: u q < p, with u uniform on [0, 1), holds with probability min(1, p / q), and never
    where p = 0 (with one-hot p and q, greedy: exactly when the verifier's argmax is the proposal)."""
    return bool(u * q < p)


def _check(prompt, max_new, draft_len, temperature, top_k, capacity) -> None:
    if not isinstance(prompt, torch.Tensor) or prompt.ndim != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be one sequence of at least one token, shape (1, T); got "
                         f"{tuple(getattr(prompt, 'shape', ()))}")
    if not isinstance(draft_len, int) or isinstance(draft_len, bool) or draft_len < 1:
        raise ValueError(f"draft_len (B) must be an int >= 1, got {draft_len!r}")
    if not isinstance(max_new, int) or max_new < 0:
        raise ValueError(f"max_new must be an int >= 0, got {max_new!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 or None: no cut), got {top_k}")
    if prompt.shape[1] + max_new > capacity:
        raise ValueError(f"the prompt's {prompt.shape[1]} tokens and max_new={max_new} exceed the cache capacity of "
                         f"{capacity} tokens")


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    """A token index drawn with probability proportional to `weights` (V,); one-hot weights give their index
    without drawing."""
    if int((weights > 0).sum()) == 1:
        return int(weights.argmax())
    return int(torch.multinomial(weights.float(), 1, generator=generator))


def generate(model: GPT, prompt: torch.Tensor, max_new: int, plan: Plan, draft_len: int = 4, temperature: float = 0.0,
             top_k: int | None = None, seed: int = 0) -> tuple[torch.Tensor, SpeculationStats]:
    """New tokens (1, max_new) after prompt (1, T) by self-speculative decoding, and the rounds' statistics."""
    decoder = SpeculativeDecoder(model, plan, capacity=prompt.shape[1] + max(max_new, 0))
    tokens = decoder.generate(prompt, max_new, draft_len, temperature, top_k, seed)
    return tokens, decoder.stats
