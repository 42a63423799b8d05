"""Hugging Face decoder layers evaluated many at once: f_l(h) for several layers l, each at its own input, with
its own mask, rotary table and cached keys and values.

A decoder layer of the supported families (Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3) maps the hidden state
(B, T, D) to (B, T, D) with the residual added inside, so f_l is the layer itself. Two ways to evaluate n of them:

    vmap  torch.func.functional_call of one meta-device copy of the layer, under torch.func.vmap over the layers'
          parameters stacked on a leading dim (stacked once, when the `Layers` are built): one batched call;
    loop  each layer module called in turn on its input. The layers are still independent of each other (no
          layer waits for another's output), only not batched.

`vmap` is the default and falls back to `loop` for good, with a warning, the first time vmap refuses the layer.
Its stacked parameters follow the weights as nanochat's do (`Prepared`): with grad enabled and the layers
trainable, stacked afresh at every call, so the gradient reaches them (`snlp adapt`); else stacked once and kept
until an optimizer step or a load changes a parameter.

Attention reads and writes keys and values through the `cache` argument, `cache.update(k, v, layer_idx, ...)`
(every supported layer calls it right after the rotary embedding). `_Recorder` plays that cache: it returns the
past keys and values with the new ones appended, and keeps the new ones, so that a caller can store them where it
wants; nothing is appended for good, which a solve that evaluates a layer several times per token needs.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..nanochat.prepared import Prepared

Tensor = torch.Tensor


class _Recorder:
    """The `cache` a layer sees: past keys and values (B, KV, P, hd) or None, and this call's new ones."""

    def __init__(self, past_k: Tensor | None = None, past_v: Tensor | None = None):
        self.past_k, self.past_v = past_k, past_v
        self.k = self.v = None

    def update(self, k: Tensor, v: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        self.k, self.v = k, v
        if self.past_k is None:
            return k, v
        return torch.cat([self.past_k, k], dim=-2), torch.cat([self.past_v, v], dim=-2)


class _KeysValuesOnly(Exception):
    """Raised by `_StopAfterUpdate` once attention has handed over this call's keys and values."""


class _StopAfterUpdate(_Recorder):
    """A `_Recorder` that ends the layer's forward at `update`: keys and values without attention or MLP."""

    def update(self, k: Tensor, v: Tensor, layer_idx: int, *args, **kwargs):
        self.k, self.v = k, v
        raise _KeysValuesOnly


@dataclass(frozen=True)
class LayerInputs:
    """What a layer needs beside its state, per layer of a call: masks (n, 1, 1, T, P + T) additive, rotary cos and
    sin (n, 1, T, hd), and past keys and values (n, B, KV, P, hd), or None before the first token."""

    masks: Tensor
    cos: Tensor
    sin: Tensor
    past_k: Tensor | None = None
    past_v: Tensor | None = None


class Layers:
    """The decoder layers of a model, evaluable n at a time: `evaluate(first, inputs, extra)` applies layers
    first .. first + n - 1 to inputs (n, B, T, D) and returns their outputs and new keys and values."""

    def __init__(self, layers: nn.ModuleList, parallel: str = "vmap"):
        if parallel not in ("vmap", "loop"):
            raise ValueError(f"parallel must be 'vmap' or 'loop', got {parallel!r}")
        self.modules = list(layers)
        self.parallel = parallel
        names = inspect.signature(self.modules[0].forward).parameters
        self.cache_name = "cache" if "cache" in names else "past_key_values"  # transformers >= 5.24 renamed it
        if parallel == "vmap":
            shapes = {tuple((n, tuple(p.shape)) for n, p in m.named_parameters()) for m in self.modules}
            if len(shapes) > 1 or any(True for m in self.modules for _ in m.buffers()):
                self._fall_back("the layers do not share one parameter structure")
            else:
                self.prepared = Prepared()
                self.base = copy.deepcopy(self.modules[0]).to("meta")
                self._batched = torch.func.vmap(self._call_base)

    def refresh(self) -> None:
        """Forget the stacked parameters if any layer's changed since the last call (once per forward)."""
        if self.parallel == "vmap":
            self.prepared.refresh(p for m in self.modules for p in m.parameters())

    def _stack(self, layers: list[nn.Module]) -> dict[str, Tensor]:
        """The layers' parameters stacked on a leading dim, by name."""
        params = [dict(m.named_parameters()) for m in layers]
        return {name: torch.stack([p[name] for p in params]) for name in params[0]}

    def stacked(self, first: int, n: int) -> dict[str, Tensor]:
        """The parameters of layers first .. first + n - 1, stacked: afresh, carrying the gradient, where grad is
        enabled and one of them trains; else views of one stack of every layer, kept while the weights stay."""
        layers = self.modules[first:first + n]
        if torch.is_grad_enabled() and any(p.requires_grad for m in layers for p in m.parameters()):
            return self._stack(layers)
        with torch.no_grad():
            every = self.prepared.get("layers", lambda: self._stack(self.modules))
        return {name: t[first:first + n] for name, t in every.items()}

    def _fall_back(self, reason: str) -> None:
        warnings.warn(f"decoder layers evaluated one by one (parallel='loop'), not under vmap: {reason}",
                      stacklevel=3)
        self.parallel = "loop"

    def _kwargs(self, mask, cos, sin, recorder) -> dict:
        return {"attention_mask": mask, "position_embeddings": (cos, sin), self.cache_name: recorder}

    def _call_base(self, params, x, mask, cos, sin, past):
        recorder = _Recorder(*past)
        out = torch.func.functional_call(self.base, params, (x,), self._kwargs(mask, cos, sin, recorder))
        return out, recorder.k, recorder.v

    def evaluate(self, first: int, inputs: Tensor, extra: LayerInputs,
                 batched: bool = True) -> tuple[Tensor, Tensor, Tensor]:
        """Outputs (n, B, T, D), keys and values (n, B, KV, T, hd) of layers first .. first + n - 1; batched=False
        calls the modules one by one (what the sequential trace does)."""
        n = inputs.shape[0]
        past = () if extra.past_k is None else (extra.past_k, extra.past_v)
        if batched and self.parallel == "vmap":
            params = self.stacked(first, n)
            try:
                with warnings.catch_warnings():
                    # On the CPU, vmap runs the fused SDPA kernel per layer (no batching rule): measured as fast
                    # as the alternatives (the unfused maths, eager attention), so the warning says nothing new.
                    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
                    return self._batched(params, inputs, extra.masks, extra.cos, extra.sin, past)
            except (RuntimeError, NotImplementedError) as err:
                if "vmap" not in str(err) and "batching rule" not in str(err):
                    raise
                self._fall_back(f"{type(err).__name__}: {str(err).splitlines()[0]}")
        return self._loop(first, inputs, extra, _Recorder)

    def keys_values(self, first: int, inputs: Tensor, extra: LayerInputs) -> tuple[Tensor, Tensor]:
        """Keys and values (n, B, KV, T, hd) of layers first .. at their inputs (n, B, T, D), without attention or
        MLP: each layer's forward stops where it hands them to the cache."""
        return self._loop(first, inputs, extra, _StopAfterUpdate)[1:]

    def _loop(self, first: int, inputs: Tensor, extra: LayerInputs, recorder: type[_Recorder]):
        """The layer modules called one by one, each with a fresh `recorder` over its past keys and values:
        (outputs or None when the recorder stops the forward, keys, values), stacked over the layers."""
        outs, ks, vs = [], [], []
        for i in range(inputs.shape[0]):
            cache = recorder(*(() if extra.past_k is None else (extra.past_k[i], extra.past_v[i])))
            try:
                outs.append(self.modules[first + i](inputs[i], **self._kwargs(extra.masks[i], extra.cos[i],
                                                                              extra.sin[i], cache)))
            except _KeysValuesOnly:
                pass
            ks.append(cache.k)
            vs.append(cache.v)
        return (torch.stack(outs) if outs else None), torch.stack(ks), torch.stack(vs)

    def jvp(self, first: int, inputs: Tensor, tangents: Tensor, extra: LayerInputs) -> tuple[Tensor, Tensor]:
        """(outputs, J tangents) of the layers, by forward-mode AD through the unfused SDPA maths (the fused
        attention kernels have no forward derivative)."""
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(lambda x: self.evaluate(first, x, extra)[0], (inputs.contiguous(),), (tangents,))
