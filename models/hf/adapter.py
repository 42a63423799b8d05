"""A Hugging Face causal LM as the model SNLP solves: `HFModel` gives `transformers` models the surface that
`snlp.forward`, `snlp.Plan`, the `Decoder` and the evaluation grid use for nanochat's GPT, so every strategy,
schedule and diagnostic runs on them unchanged.

    lm = transformers.AutoModelForCausalLM.from_pretrained(directory)
    model = HFModel(lm)                         # or hf.load(directory)
    out = snlp.forward(model, idx, snlp.Plan(n_par=12, iters=2))

The residual equation: h_0 is the token embedding (Gemma's embedding module scales by sqrt(D) itself), block l is
decoder layer l (every supported layer adds its residual inside, so f_l is the layer), and the head is the final
norm, the LM head, and Gemma's final logit softcap. The masks and rotary tables are built once per input
(`embed`): additive causal masks, with a sliding window on the layers whose `config.layer_types` entry says
"sliding_attention" (all layers of a Mistral with `sliding_window`), and Gemma3's rotary table per layer type.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
from torch import nn

from ..nanochat.block import KVCache
from .layers import LayerInputs, Layers
from .system import HFSystem

Tensor = torch.Tensor

# model_type -> family: the families share one decoder-layer call (state, mask, rotary (cos, sin), cache)
SUPPORTED = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "gemma2": "Gemma2",
             "gemma3_text": "Gemma3"}
ATTENTION = ("eager", "sdpa")  # the implementations that take an additive mask as it is built here
SLIDING = "sliding_attention"


class UnsupportedModel(ValueError):
    """A model this adapter cannot run: the message names what it is and what is supported."""


@dataclass(frozen=True)
class HFConfig:
    """The shape of the model as the SNLP code reads it (what GPTConfig gives for nanochat)."""

    n_layer: int
    sequence_len: int  # the model's max_position_embeddings
    vocab_size: int
    n_kv_head: int  # the keys' and values' shape in a KVCache, as GPTConfig gives it
    head_dim: int
    use_mhc: bool = False  # hyper-connections: none in these families


@dataclass(frozen=True)
class Embedded:
    """The embedded tokens and what every layer needs beside its state, built once per input: x0 (B, T, D), the
    first token's position, an additive mask (1, 1, T, position + T) per window (None: plain
    causal), and the rotary (cos, sin) (1, T, hd) per rotary type."""

    x0: Tensor
    position: int
    masks: dict
    rotary: dict
    last_embedding: None = None  # nanochat's smear reads the previous token's embedding; these models have none


def causal_mask(position: int, queries: int, window: int | None, dtype: torch.dtype, device) -> Tensor:
    """Additive mask (1, 1, queries, position + queries): query i (at position + i) sees key j when j <= position
    + i and, with a window, j > position + i - window (transformers' sliding_window_overlay)."""
    q = torch.arange(position, position + queries, device=device)[:, None]
    k = torch.arange(position + queries, device=device)[None, :]
    visible = (k <= q) if window is None else (k <= q) & (k > q - window)
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(visible, zero, torch.finfo(dtype).min)[None, None]


def check_supported(kind: str, where: str = "", what: str = "") -> None:
    """Refuse a model_type outside SUPPORTED, naming it (`where` it comes from, `what` it is) and the supported
    ones."""
    if kind not in SUPPORTED:
        raise UnsupportedModel(f"{where}model_type {kind!r}{what} is not supported; supported: "
                               f"{', '.join(f'{v} ({k})' for k, v in SUPPORTED.items())}")


class HFModel(nn.Module):
    """A supported `transformers` causal LM as a layer system's model. `parallel`: "vmap" (layers stacked and
    evaluated in one batched call; falls back to "loop" where vmap refuses the layer) or "loop". The stacked
    parameters follow the weights (layers.py): an optimizer step or a load is seen at the next forward."""

    def __init__(self, lm: nn.Module, parallel: str = "vmap"):
        super().__init__()
        cfg = lm.config
        kind = getattr(cfg, "model_type", type(cfg).__name__)
        check_supported(kind, what=f" ({type(lm).__name__})")
        if cfg._attn_implementation not in ATTENTION:
            raise UnsupportedModel(f"attn_implementation {cfg._attn_implementation!r} is not supported (the adapter "
                                   f"passes additive masks): load the model with attn_implementation in {ATTENTION}")
        if getattr(cfg, "use_bidirectional_attention", False):
            raise UnsupportedModel("use_bidirectional_attention=True: the adapter solves causal models only")
        self.lm = lm
        self.family = SUPPORTED[kind]
        L = cfg.num_hidden_layers
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.config = HFConfig(L, cfg.max_position_embeddings, cfg.vocab_size, cfg.num_key_value_heads, head_dim)
        self.layers = Layers(lm.model.layers[:L], parallel)
        types = getattr(cfg, "layer_types", None) or ["full_attention"] * L
        window = getattr(cfg, "sliding_window", None)
        if kind == "mistral" and window is not None:
            types = [SLIDING] * L  # Mistral slides every layer when it has a window
        self.windows = [window if t == SLIDING else None for t in types]
        # Gemma3 keeps one rotary table per layer type (local and global bases); the others one for all.
        self._rotary_by_type = "layer_type" in inspect.signature(lm.model.rotary_emb.forward).parameters
        self.rotary_types = list(types) if self._rotary_by_type else ["default"] * L
        self.softcap = getattr(cfg, "final_logit_softcapping", None)

    def __deepcopy__(self, memo) -> "HFModel":
        """A copy with its own weights (a teacher and its student: `snlp adapt`), built anew around a copy of the
        transformers model, as the layers' evaluator holds functions that do not copy."""
        return HFModel(copy.deepcopy(self.lm, memo), self.layers.parallel)

    # -- the surface snlp, the Decoder and the evaluation read -----------------------------------------------------

    @property
    def blocks(self) -> nn.ModuleList:
        """The decoder layers, block l = f_(l+1): what a segment's training touches."""
        return self.lm.model.layers

    backout_layer = 0  # nanochat's backout state; these models have none, and `head` ignores it

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.lm_head

    @property
    def dtype(self) -> torch.dtype:
        return self.lm.dtype

    def forward(self, idx: Tensor) -> Tensor:
        """The model's own forward (transformers' code): logits (B, T, vocab_size). The baseline of every
        speedup, and the reference the adapter's trace reproduces."""
        self.check_tokens(idx)
        return self.lm(idx, use_cache=False).logits

    def check_tokens(self, idx: Tensor, position: int = 0) -> None:
        if not isinstance(idx, Tensor) or idx.ndim != 2 or idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"idx must be an integer tensor (B, T), got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)} of shape {tuple(getattr(idx, 'shape', ()))}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.config.vocab_size):
            raise ValueError(f"idx holds token ids outside [0, {self.config.vocab_size}) (the model's vocab_size)")
        if position + idx.shape[1] > self.config.sequence_len:
            raise ValueError(f"{position + idx.shape[1]} tokens exceed the model's max_position_embeddings of "
                             f"{self.config.sequence_len}")

    def embed(self, idx: Tensor, position: int = 0, previous=None) -> Embedded:
        """h_0 (B, T, D) and, for tokens at positions position .., the masks and rotary tables every layer uses."""
        self.check_tokens(idx, position)
        self.layers.refresh()  # the weights may have changed since the last forward (an optimizer step)
        return self.embedded(self.lm.model.embed_tokens(idx), position)  # x0 (B, T, D)

    def embedded(self, x0: Tensor, position: int) -> Embedded:
        """The Embedded of the state x0 (B, T, D) at `position`: the masks and rotary tables of its tokens (what a
        stage of a split model builds around the x0 it receives)."""
        T = x0.shape[1]
        pos = torch.arange(position, position + T, device=x0.device)[None]  # (1, T)
        masks = {w: causal_mask(position, T, w, x0.dtype, x0.device) for w in set(self.windows)}
        rotary = {}
        for kind in set(self.rotary_types):
            args = (kind,) if self._rotary_by_type else ()
            cos, sin = self.lm.model.rotary_emb(x0, pos, *args)
            rotary[kind] = (cos.to(x0.dtype), sin.to(x0.dtype))
        return Embedded(x0, position, masks, rotary)

    def layer_inputs(self, emb: Embedded, first: int, n: int, cache: KVCache | None = None,
                     unit: int = 0) -> LayerInputs:
        """What layers first .. first + n - 1 need beside their states; with a cache, the past keys and values of
        its units unit .. unit + n - 1 (the same layers)."""
        layers = range(first, first + n)
        masks = torch.stack([emb.masks[self.windows[l]] for l in layers]) if len(set(self.windows)) > 1 else \
            emb.masks[self.windows[first]].expand(n, *emb.masks[self.windows[first]].shape)
        cos = torch.stack([emb.rotary[self.rotary_types[l]][0] for l in layers])
        sin = torch.stack([emb.rotary[self.rotary_types[l]][1] for l in layers])
        past_k, past_v = (None, None) if cache is None else cache.past(slice(unit, unit + n), emb.position)
        return LayerInputs(masks, cos, sin, past_k, past_v)

    def trace(self, emb: Embedded, stop: int | None = None, cache: KVCache | None = None, start: int = 0,
              state: Tensor | None = None) -> list[Tensor]:
        """h_start .. h_stop (default h_0 .. h_L), layers start .. stop - 1 one after another from `state` = h_start
        (default h_0 = emb.x0); with a cache (unit i = layer start + i), each layer attends to its cached keys and
        values and stores these tokens'."""
        states = [emb.x0 if state is None else state]
        for layer in range(start, self.config.n_layer if stop is None else stop):
            extra = self.layer_inputs(emb, layer, 1, cache, layer - start)
            out, k, v = self.layers.evaluate(layer, states[-1][None], extra, batched=False)
            if cache is not None:
                cache.write(slice(layer - start, layer - start + 1), emb.position, k, v)
            states.append(out[0])
        return states

    def head(self, last: Tensor, backout: Tensor | None = None) -> Tensor:
        """Logits (B, T, vocab_size) from the last state: final norm, LM head, and Gemma's final softcap."""
        logits = self.lm.lm_head(self.lm.model.norm(last))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def layer_system(self, emb: Embedded, start: int = 0, fuse: int = 1, past: KVCache | None = None,
                     stop: int | None = None) -> HFSystem:
        """The layer system of layers start .. stop - 1 (default: to the last) on these tokens; with `past`, its
        unit i is layer start + i."""
        if fuse != 1:
            raise ValueError(f"Plan.fuse={fuse}: fusing layers is defined for nanochat models only; use fuse=1")
        return HFSystem(self, emb, start, past, self.config.n_layer if stop is None else stop)
