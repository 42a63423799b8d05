"""What defines a training run: `TrainConfig`, nanochat's model sizing, and the presets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import torch

from ..inference import snlp
from ..nanochat.gpt import GPT, GPTConfig
from .regularizer import Regularizer


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a run; a checkpoint resumes only under an equal config (`steps` may grow)."""

    model: GPTConfig = field(default_factory=GPTConfig)
    steps: int = 300
    batch_size: int = 16  # sequences per step, over all ranks
    matrix_lr: float = 0.02  # Muon
    embedding_lr: float = 0.3  # AdamW, scaled by (n_embd / 768) ** -0.5 as nanochat does
    unembedding_lr: float = 0.008
    scalar_lr: float = 0.5
    weight_decay: float = 0.0
    warmup_steps: int = 20
    warmdown_ratio: float = 0.5
    final_lr_frac: float = 0.05
    grad_clip: float = 1.0
    regularizer: Regularizer | None = None
    reg_lambda: float = 0.0
    reg_warmup: float = 0.2  # fraction of training over which w(t) ramps from 0 to 1
    sft_plan: snlp.Plan | None = None  # train through the SNLP forward instead of the sequential one
    init_from: str | None = None  # a checkpoint directory to start from (fine-tuning) instead of nanochat's init
    eval_every: int = 100
    eval_tokens: int = 16384
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int | None = 3  # the newest checkpoints kept (the final one among them); None: all
    seed: int = 0

    def check(self) -> None:
        """Refuse, before any work, a run that cannot be trained: a count out of range, or a regularizer or
        SNLP-forward plan that the model does not take (checked on the model's shapes, without weights)."""
        for name in ("steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.keep_checkpoints is not None and (not isinstance(self.keep_checkpoints, int)
                                                  or self.keep_checkpoints < 1):
            raise ValueError(f"keep_checkpoints must be an int >= 1 or None (all), got {self.keep_checkpoints!r}")
        model = model_shapes(self.model)
        if self.regularizer is not None:
            self.regularizer.check(model)
        if self.sft_plan is not None:
            self.sft_plan.check(model)

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=repr))


BYTES_PER_PARAMETER = 16  # float32 weights and gradients, and two optimizer moments
ACTIVATION_PASSES = 24  # float32 states of (batch x tokens x width) kept per layer for the backward pass, roughly


@dataclass(frozen=True)
class Footprint:
    """A rough memory estimate of training, from the config alone (no model is built): the parameters (nanochat's
    blocks: q, k, v, o and a 4x MLP; the embedding and the head; value embeddings on half the layers), the bytes
    to train them, the activations of one batch, and the rotary tables (10 x sequence_len positions, float64)."""

    parameters: int
    training_bytes: int
    activation_bytes: int
    rotary_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.training_bytes + self.activation_bytes + self.rotary_bytes


def footprint(cfg: "TrainConfig") -> Footprint:
    m = cfg.model
    D, L, V, kv = m.n_embd, m.n_layer, m.padded_vocab_size, m.n_kv_head * m.head_dim
    block = 2 * D * D + 2 * D * kv + 8 * D * D
    values = 0 if m.no_ve else (L + 1) // 2 * V * kv
    parameters = L * block + 2 * V * D + values
    activations = cfg.batch_size * m.sequence_len * D * L * ACTIVATION_PASSES * 4
    rotary = 2 * 10 * m.sequence_len * (m.head_dim // 2) * 8
    return Footprint(parameters, parameters * BYTES_PER_PARAMETER, activations, rotary)


def model_shapes(config: GPTConfig) -> GPT:
    """The model of `config` on the meta device: its shapes, no weights; what plans are checked against before a
    run's work starts."""
    with torch.device("meta"):
        return GPT(config)


def gpu_model(depth: int, aspect_ratio: int = 64, head_dim: int = 128, sequence_len: int = 2048,
              vocab_size: int = 32768, **options) -> GPTConfig:
    """nanochat's sizing: n_embd = depth * aspect_ratio rounded up to a multiple of head_dim."""
    dim = -(-depth * aspect_ratio // head_dim) * head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=dim // head_dim,
                     n_kv_head=dim // head_dim, n_embd=dim, **options)


PRESETS = {
    # Trains in a few minutes on a 2-core CPU (0.6 s a step; 1.2 s with the IDN regularizer on 2 configs).
    "tiny": TrainConfig(model=GPTConfig(sequence_len=128, vocab_size=2048, n_layer=8, n_head=2, n_kv_head=2,
                                        n_embd=128), steps=250, batch_size=16, warmup_steps=20, eval_every=50,
                        eval_tokens=16384),
    # `snlp demo --quick`: the whole story at toy size, both models in well under a minute on a 2-core CPU.
    "quick": TrainConfig(model=GPTConfig(sequence_len=64, vocab_size=512, n_layer=6, n_head=1, n_kv_head=1,
                                         n_embd=64), steps=200, batch_size=16, warmup_steps=10, eval_every=50,
                         eval_tokens=4096),
    # nanochat's d12 and the SNLP paper's 0.5B shape (depth 32, aspect 20: dim 640) for GPUs.
    "d12": TrainConfig(model=gpu_model(12), steps=5000, batch_size=32, warmup_steps=40, eval_every=250,
                       eval_tokens=2**20),
    "snlp-0.5b": TrainConfig(model=gpu_model(32, aspect_ratio=20), steps=20000, batch_size=32, warmup_steps=40,
                             eval_every=500, eval_tokens=2**20),
}
