"""The decoder layers start .. stop - 1 of an `HFModel` on some tokens, as a layersolve `LayerSystem`.

f_l is decoder layer l at the tokens' masks and rotary tables. The skip path of every supported layer is the
identity (h + attn(norm(h)) + mlp(norm(.))), so `scales` are ones and IDN is the natural surrogate.
With a KV cache (decoding) each layer attends to its cached keys and values of earlier tokens, every evaluation
writes the keys and values of its inputs into the cache (at these tokens' positions, overwriting), and
`store_kv` makes them the final iterate's, as nanochat's `BlockSystem` does.
"""

from __future__ import annotations

import torch

import layersolve as ls

from ..nanochat.block import KVCache


class HFSystem(ls.LayerSystem):
    def __init__(self, model, emb, start: int, cache: KVCache | None = None, stop: int | None = None):
        self.model, self.emb, self.start, self.cache = model, emb, start, cache
        n = (model.config.n_layer if stop is None else stop) - start
        x0 = emb.x0
        super().__init__(self._outputs, n, scales=torch.ones(n, dtype=x0.dtype, device=x0.device),
                         state_shape=tuple(x0.shape), dtype=x0.dtype)

    def _extra(self, units: slice):
        first, stop, _ = units.indices(self.num_layers)
        return self.model.layer_inputs(self.emb, self.start + first, stop - first, self.cache, first)

    def _outputs(self, units: slice, inputs: torch.Tensor) -> torch.Tensor:
        out, k, v = self.model.layers.evaluate(self.start + units.indices(self.num_layers)[0], inputs,
                                               self._extra(units))
        if self.cache is not None:
            self.cache.write(units, self.emb.position, k, v)
        return out

    def jvp(self, layers: slice, inputs: torch.Tensor, tangents: torch.Tensor):
        # A transform cannot write the KV cache: the JVP reads it only.
        first = layers.indices(self.num_layers)[0]
        return self.model.layers.jvp(self.start + first, inputs, tangents, self._extra(layers))

    def store_kv(self, trace: torch.Tensor, start: int = 0) -> None:
        """Make the cache hold each layer's keys and values at its input in `trace` (n+1, *state), the final
        iterate; the units before `start` already hold them (see nanochat's BlockSystem.store_kv)."""
        if start >= self.num_layers:
            return
        units = slice(start, self.num_layers)
        k, v = self.model.layers.keys_values(self.start + start, trace[start:-1], self._extra(units))
        self.cache.write(units, self.emb.position, k, v)
