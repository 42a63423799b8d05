"""Layer-parallel decoding across processes (torch.distributed: gloo on CPU, nccl on GPU). A nanochat model is split
by layers into P stages of M = L / P blocks (stages.py); rank c holds only stage c + 1's weights (`load_stage`), and
rank 0 also the embedding and the head. Each decoding step runs either as a pipeline, each stage waiting for the
previous one's output (the baseline: P - 1 of P ranks idle at batch 1), or with SNLP over stages: every rank
evaluates its stage at once from a guess of its input (x_c^0 = x_0), then K corrections

    Delta_c = r_c + g Delta_{c-1},   r_c = F_c(x_{c-1}^k) - x_c^k,   x_c^{k+1} = x_c^k + Delta_c

with g = 1 for the identity surrogate (the change of a stage's input is the sum of the residuals before it, an
exclusive scan over ranks) and g = 0 for Jacobi. K = P reproduces the pipeline (finite termination over stages).

Messages, all point to point:
- each step, rank 0 sends every rank x_0 and the token ids (every block blends x_0 in; a rank looks up its own
  layers' value embeddings from the ids);
- SNLP: each iteration, every rank sends every other its residual r_c, B x T x D values (1 KB per token in float32
  at D = 256; 2.5 KB in bfloat16 at the 0.5B shape's D = 1280), so that each holds the whole stage trace and
  applies the same scan. That is an all-gather: one round of P - 1 concurrent messages, where a scan through the
  ranks would take P - 1 hops one after another. It is written as isend / irecv pairs rather than
  dist.all_gather so that a peer that is gone or silent is named (and on this CPU a 1 KB exchange between two gloo
  processes took 0.37 ms this way, 0.78 ms through all_gather);
- the pipeline: rank c sends its stage output to rank c + 1, the last rank its output to rank 0;
- the backout state goes to rank 0 from the rank whose stage holds it.

KV caches: each rank caches its own blocks' keys and values, written from the final iterate. A rank whose input was
exact at its last evaluation (c < K) already wrote them; the others rewrite them from their stage's states moved by
the correction of its input (stages.py), one batched projection that runs while rank 0 computes the head.

Faults: every receive waits at most `timeout` seconds; a peer whose process has exited or that sends nothing in
time raises StageError naming it, so no rank waits forever. (With nccl, waiting orders the GPU stream rather than
the host; there the process group's own timeout, set to the same seconds, ends a hung exchange.)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import layersolve as ls

from ..nanochat import checkpoint
from ..nanochat.block import KVCache
from .decode import sample
from .stages import HFStage, Stage, inside, split, surrogate_gain

NAMES = {1.0: "IDN", 0.0: "Jacobi"}  # the stage surrogates by their gain
STOP, SEQUENCE = 0, 1  # the first field of the header rank 0 sends before each sequence


class StageError(RuntimeError):
    """A peer rank that has exited, or sent nothing within the timeout: the message names it."""


@dataclass(frozen=True)
class StagePlan:
    """How a step solves the stages. iters: K SNLP iterations (every stage at once, 1 <= K <= P), or None for the
    pipeline (each stage waits for the previous one). jacobian: the stage-level surrogate, Identity or Zero."""

    iters: int | None = None
    jacobian: ls.Jacobian = field(default_factory=ls.Identity)

    @property
    def pipeline(self) -> bool:
        return self.iters is None

    def check(self, stages: int) -> None:
        if self.iters is not None and (not isinstance(self.iters, int) or not 1 <= self.iters <= stages):
            raise ValueError(f"iters={self.iters!r} must be an int in [1, {stages}] (the stages; {stages} is exact), "
                             f"or None for the pipeline")
        surrogate_gain(self.jacobian)

    def describe(self) -> str:
        return "pipeline" if self.pipeline else f"SNLP {NAMES[surrogate_gain(self.jacobian)]} K={self.iters}"


def stage_keys(stage: int, stages: int):
    """Which state_dict keys rank `stage` loads (a `keep` for checkpoint.load): its blocks and their value
    embeddings, the per-layer lambdas (L numbers), and on rank 0 the embedding, the smear and the head."""
    rank0 = ("transformer.wte.", "smear_", "lm_head.", "backout_lambda")

    def keep(cfg, key: str) -> bool:
        size = split(cfg.n_layer, stages)
        own = {str(i) for i in range(stage * size, (stage + 1) * size)}
        parts = key.split(".")
        if key.startswith("transformer.h.") or key.startswith("value_embeds."):
            return parts[2 if parts[0] == "transformer" else 1] in own
        if key in ("resid_lambdas", "x0_lambdas"):
            return True
        return stage == 0 and key.startswith(rank0)

    return keep


def load_stage(directory: str | Path, stage: int, stages: int, step: int | None = None, device="cpu",
               dtype: torch.dtype | None = None) -> Stage | HFStage:
    """Stage `stage` of `stages` of a model directory with only its weights in memory: a nanochat checkpoint (the
    rest stays on the meta device; see checkpoint.load), or a Hugging Face safetensors directory (one with a
    config.json; see hf.load_stage). dtype: default float32 for nanochat, the checkpoint's for Hugging Face."""
    directory = Path(directory)
    if (directory / "config.json").exists():
        from .. import hf

        layers = json.loads((directory / "config.json").read_text()).get("num_hidden_layers")
        if not isinstance(layers, int):
            raise ValueError(f"{directory / 'config.json'}: no num_hidden_layers")
        size = split(layers, stages)
        model = hf.load_stage(directory, stage * size, size, ends=stage == 0, dtype=dtype).to(device)
        return HFStage(model, stage, size)
    model = checkpoint.load(directory, step, device, dtype or torch.float32, keep=stage_keys(stage, stages)).eval()
    return Stage(model, stage, split(model.config.n_layer, stages))


def join_process_group(timeout: float | None = None) -> tuple[int, torch.device]:
    """Join torchrun's process group, nccl on GPU and gloo on CPU, unless joined already: (rank, device), each rank
    on its LOCAL_RANK's GPU. timeout: seconds a collective may wait (default torch's)."""
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo",
                                **({} if timeout is None else {"timeout": timedelta(seconds=timeout)}))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), device


def init_process_group(stages: int, timeout: float) -> tuple[int, torch.device]:
    """`join_process_group` for a model split into `stages` stages: the world must be one process a stage."""
    world = int(os.environ.get("WORLD_SIZE", "0"))
    if world != stages:
        raise ValueError(f"stages={stages} runs one stage per process: start it under `torchrun --nproc-per-node "
                         f"{stages}` (WORLD_SIZE is {world or 'unset'})")
    return join_process_group(timeout)


class Peers:
    """Point-to-point messages between the ranks of the default process group, each receive awaited for at most
    `timeout` seconds."""

    def __init__(self, timeout: float, device: torch.device | str = "cpu"):
        """device: where messages are received (nccl sends device tensors only)."""
        self.rank, self.world, self.timeout = dist.get_rank(), dist.get_world_size(), timeout
        self.device = torch.device(device)

    def send(self, tensor: torch.Tensor, dst: int):
        return dist.isend(tensor.contiguous(), dst)

    def recv(self, buffer: torch.Tensor, src: int, what: str) -> torch.Tensor:
        self.wait(dist.irecv(buffer, src), src, what)
        return buffer

    def wait(self, work, peer: int, what: str) -> None:
        try:
            if not work.wait(timedelta(seconds=self.timeout)):
                raise RuntimeError("timed out")
        except RuntimeError as err:
            gone = "closed by peer" in str(err) or "Connection reset" in str(err)
            why = "its process has exited" if gone else f"nothing arrived within {self.timeout:g} s"
            raise StageError(f"rank {self.rank}: no {what} from rank {peer} ({why})") from None

    def broadcast(self, tensor: torch.Tensor, what: str) -> None:
        """Send `tensor` to every other rank, and wait until it has left."""
        self._settle(self._send_all(tensor), what)

    def exchange(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        """Every rank's `tensor` (same shape on all), own included: the all-gather."""
        tensor = tensor.contiguous()
        sends = self._send_all(tensor)
        out = [tensor if r == self.rank else self.recv(torch.empty_like(tensor), r, what) for r in range(self.world)]
        self._settle(sends, what)
        return out

    def _send_all(self, tensor: torch.Tensor) -> dict:
        return {r: self.send(tensor, r) for r in range(self.world) if r != self.rank}

    def _settle(self, sends: dict, what: str) -> None:
        for r, work in sends.items():
            self.wait(work, r, f"acknowledgement of the {what}")


class StageRunner:
    """One rank's part of decoding with a model split into `stages` stages. Rank 0 calls `generate` / `decode`
    (and `close` when done); the other ranks call `serve`, which follows rank 0's sequences until it closes."""

    def __init__(self, stage: Stage | HFStage, stages: int, peers: Peers):
        self.stage, self.peers, self.rank, self.stages = stage, peers, peers.rank, stages
        if stage.index != self.rank:
            raise ValueError(f"rank {self.rank} was given stage {stage.index}: each rank runs its own")
        # the backout state h_b (None: the model has none) lies in the chain of stage `source[0]` at `source[1]`;
        # strictly inside it, its rank sends it (pipeline) or adds it to the last exchange (SNLP)
        self.source = stage.backout_source()
        self.inside = inside(self.source, stage.size)
        self.step_seconds: list[float] = []  # rank 0: each step's wall time of the last sequence
        self.trace: torch.Tensor | None = None  # SNLP: the last step's final stage trace (P+1, *state)
        self.logits: torch.Tensor | None = None  # rank 0: the last step's logits (B, T, V)

    # -- rank 0 ---------------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, prompt: torch.Tensor, max_new: int, plan: StagePlan, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0) -> torch.Tensor:
        """New tokens (B, max_new) after prompt (B, T)."""
        generator = torch.Generator(device=prompt.device).manual_seed(seed)
        out = []

        def feed(logits):
            out.append(sample(logits[:, -1], temperature, top_k, generator))
            return out[-1][:, None]

        self._sequence(prompt, max_new, plan, feed)
        return torch.stack(out, dim=1) if out else prompt.new_zeros(prompt.shape[0], 0)

    @torch.inference_mode()
    def decode(self, prompt: torch.Tensor, tokens: torch.Tensor, plan: StagePlan) -> torch.Tensor:
        """Logits (B, n, V) of each next token after the prompt, feeding the given tokens (B, n) one at a time
        (teacher forcing: a plan's top-1 agreement with another's tokens)."""
        out = []

        def feed(logits):
            out.append(logits[:, -1])
            return tokens[:, len(out) - 1:len(out)]

        self._sequence(prompt, tokens.shape[1], plan, feed)
        return torch.stack(out, dim=1)

    def close(self) -> None:
        """Release the other ranks from `serve`."""
        self._header([STOP, 0, 0, 0, 0])

    def _sequence(self, prompt: torch.Tensor, n: int, plan: StagePlan, feed) -> None:
        """n steps' logits, the prompt's then one token at a time, each given to feed(logits), which returns the
        next tokens (B, 1)."""
        self.stage.check_tokens(prompt)
        B, T = prompt.shape
        if T + n > self.stage.max_tokens:
            raise ValueError(f"a prompt of {T} tokens and {n} more exceed the model's {self.stage.max_tokens} "
                             f"positions")
        plan.check(self.stages)
        self._header([SEQUENCE, B, T, n, self._plan_code(plan)])
        self._start(T + n)
        self.step_seconds = []
        idx = prompt
        for _ in range(n):
            start = time.perf_counter()
            self.logits = logits = self._step(plan, B, idx.shape[1], idx)
            idx = feed(logits)
            self.step_seconds.append(time.perf_counter() - start)

    def _header(self, fields: list[int]) -> None:
        self.peers.broadcast(torch.tensor(fields, device=self.peers.device), "header")  # nccl: device tensors

    # -- the other ranks ------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def serve(self) -> None:
        """Follow rank 0's sequences until it closes."""
        while True:
            header = torch.zeros(5, dtype=torch.long, device=self.peers.device)
            command, B, T, n, code = self.peers.recv(header, 0, "header").tolist()
            if command == STOP:
                return
            plan = self._plan(code)
            self._start(T + n)
            for s in range(n):
                self._step(plan, B, T if s == 0 else 1)

    # -- every rank -----------------------------------------------------------------------------------------------

    @staticmethod
    def _plan_code(plan: StagePlan) -> int:
        """A plan as one int: 0 for the pipeline, else 2 K + (1 for the identity, 0 for Jacobi)."""
        return 0 if plan.pipeline else 2 * plan.iters + int(surrogate_gain(plan.jacobian))

    @staticmethod
    def _plan(code: int) -> StagePlan:
        if code == 0:
            return StagePlan()
        return StagePlan(code // 2, ls.Identity() if code % 2 else ls.Zero())

    def _start(self, capacity: int) -> None:
        self.cache = KVCache(self.stage.size, capacity)
        self.position, self.previous = 0, None

    def _step(self, plan: StagePlan, B: int, T: int, idx: torch.Tensor | None = None) -> torch.Tensor | None:
        """One step over T new tokens: logits (B, T, V) on rank 0, None elsewhere."""
        stage, p = self.stage, self.position
        if self.rank == 0:
            emb = stage.embed(idx, p, self.previous)
            self.previous = emb.last_embedding
            x0 = emb.x0.contiguous()
            message = torch.cat([x0.view(-1).view(torch.uint8), idx.long().contiguous().view(-1).view(torch.uint8)])
            # sent before rank 0 computes: gloo moves bytes on its own threads, which a busy core starves (a send
            # left in flight while rank 0 ran its stage reached the others milliseconds late)
            self.peers.broadcast(message, "inputs")
        else:
            x0, idx = self._receive_inputs(B, T)
            emb = stage.embedded(x0, idx, p)
        logits = (self._pipeline if plan.pipeline else self._parallel)(plan, x0, stage.context(emb))
        self.position += T
        return logits

    def _receive_inputs(self, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        dtype, shape = self.stage.dtype, self.stage.state_shape(B, T)
        n = torch.Size(shape).numel() * dtype.itemsize
        message = self.peers.recv(torch.empty(n + B * T * 8, dtype=torch.uint8, device=self.peers.device), 0, "inputs")
        return message[:n].view(dtype).view(shape), message[n:].view(torch.long).view(B, T)

    def _pipeline(self, plan: StagePlan, x0: torch.Tensor, ctx) -> torch.Tensor | None:
        """Each stage after the previous: x_c = F_c(x_{c-1}) exactly."""
        r, P = self.rank, self.stages
        h = x0 if r == 0 else self.peers.recv(torch.empty_like(x0), r - 1, "stage input")
        chain = self.stage.chain(h, ctx, self.cache)
        sends = []
        if r < P - 1:
            sends.append((self.peers.send(chain[-1], r + 1), r + 1))
        elif r > 0:
            sends.append((self.peers.send(chain[-1], 0), 0))
        source, index = self.source or (None, None)
        if r == source and r > 0:
            sends.append((self.peers.send(chain[index], 0), 0))
        logits = None
        if r == 0:
            last = chain[-1] if P == 1 else self.peers.recv(torch.empty_like(x0), P - 1, "last stage output")
            backout = None if source is None else chain[index] if source == 0 else \
                self.peers.recv(torch.empty_like(x0), source, "backout state")
            logits = self.stage.head(last, backout)
        for work, dst in sends:
            self.peers.wait(work, dst, "acknowledgement of the stage output")
        return logits

    def _parallel(self, plan: StagePlan, x0: torch.Tensor, ctx) -> torch.Tensor | None:
        """K SNLP iterations over the stages from the guess x_c^0 = x_0, the trace replicated on every rank."""
        r, P, K = self.rank, self.stages, plan.iters
        g = surrogate_gain(plan.jacobian)
        trace = x0.expand(P + 1, *x0.shape)  # (P+1, *state)
        for k in range(K):
            chain = self.stage.chain(trace[r], ctx, self.cache)
            residual = chain[-1] - trace[r + 1]
            last = k == K - 1
            if last and self.inside:  # the holder's backout state rides in the last exchange
                holder, index = self.source
                extra = chain[index] if r == holder else torch.zeros_like(residual)
                residual = torch.stack([residual, extra])
            gathered = torch.stack(self.peers.exchange(residual, "residual"))  # (P, [2,] *state)
            residuals = gathered[:, 0] if last and self.inside else gathered
            change = residuals.cumsum(dim=0) if g else residuals  # Delta_1 .. Delta_P
            trace = torch.cat([trace[:1], trace[1:] + change])  # not in place: chain[0] is a view of trace[r]
        self.trace = trace  # the last step's final stage trace x^K, the same on every rank
        change = torch.cat([torch.zeros_like(change[:1]), change])  # Delta_0 = 0: x_0 is fixed
        if g and r >= K:  # this stage's input moved after its last evaluation: its cache is rewritten
            k_, v_ = self.stage.keys_values(torch.stack(chain[:-1]) + change[r], ctx)  # g = 1 here
            self.cache.write(slice(0, self.stage.size), self.position, k_, v_)
        if r != 0:
            return None
        if self.source is None:
            backout = None
        elif self.inside:
            backout = gathered[self.source[0], 1] + g * change[self.source[0]]
        else:
            backout = trace[self.source[0] + self.source[1] // self.stage.size]
        return self.stage.head(trace[-1], backout)

