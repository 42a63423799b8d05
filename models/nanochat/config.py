"""The model's one config dataclass, nanochat's GPTConfig with the SNLP fork's fields (and ours), and the two
per-layer facts it implies: which layers have value embeddings, and each layer's attention window."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

PAD_VOCAB_TO = 64  # the vocabulary is padded to a multiple of 64 (nanochat)


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key / value heads (GQA)
    n_embd: int = 768
    window_pattern: str = "SSSL"  # tiled over layers; S = quarter context (rounded up to 128), L = full
    # The SNLP fork's options.
    no_x0_resid: bool = False  # no resid / x0 blend before blocks
    no_ve: bool = False  # no value embeddings
    use_mhc: bool = False  # hyper-connections with mhc_num_streams residual streams
    mhc_num_streams: int = 4
    mhc_sinkhorn_iters: int = 10
    mhc_sinkhorn_tau: float = 0.05
    num_mtp_steps: int = 0  # multi-token prediction heads (their weights load; the forward does not use them)
    mtp_loss_weight: float = 0.3
    # Ours: DeepSeek-style input-dependent hyper-connections.
    mhc_dynamic: bool = False

    def __post_init__(self):
        problems = []
        if self.n_embd % self.n_head:
            problems.append(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        elif (self.n_embd // self.n_head) % 2:
            problems.append(f"head_dim={self.n_embd // self.n_head} must be even for rotary embeddings")
        if self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            problems.append(f"n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head}")
        if not self.window_pattern or set(self.window_pattern.upper()) - set("SL"):
            problems.append(f"window_pattern={self.window_pattern!r} must be a non-empty string of S and L")
        if self.mhc_dynamic and not self.use_mhc:
            problems.append("mhc_dynamic needs use_mhc=True")
        if problems:
            raise ValueError("GPTConfig: " + "; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / PAD_VOCAB_TO) * PAD_VOCAB_TO

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}


def has_ve(layer: int, n_layer: int) -> bool:
    """Value embeddings on alternating layers, the last layer always included (nanochat)."""
    return layer % 2 == (n_layer - 1) % 2


def window_sizes(cfg: GPTConfig) -> list[int]:
    """Left window of each layer in tokens: the pattern tiled over layers, the last layer always full."""
    short = -(-cfg.sequence_len // 4 // 128) * 128  # quarter context, rounded up to a multiple of 128
    sizes = [cfg.sequence_len if c == "L" else short for c in
             (cfg.window_pattern.upper()[i % len(cfg.window_pattern)] for i in range(cfg.n_layer))]
    sizes[-1] = cfg.sequence_len
    return sizes
