"""The model's blocks as a layersolve `LayerSystem`: the residual equation h_l = f_l(h_{l-1}) of a run of blocks
(or fused chunks), with the structure the surrogates use (docs/math.md).

f_l is `block_forward`, the function the sequential forward runs, at the layer's own window, blend, value embedding
and hyper-connections, so a solve run to K = n iterations reproduces the sequential trace. The structure:
    scales   resid_l: the skip path h -> resid_l h + x0_l x0 has Jacobian resid_l I (Scaled); 1 without the blend;
    mixing   with mHC, the skip path's Jacobian on the stream axis, resid_l H_res_mlp H_res_attn (Mixing, SNLP's
             HCN): one matrix per layer for static mHC, per token at the iterate for dynamic mHC.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import layersolve as ls

from .block import BlockOutput, BlockWeights, Context, KVCache, block_forward, block_kv
from .mhc import static_mixing


class BlockSystem(ls.LayerSystem):
    """The system of the n units of `weights` (blocks, or fused chunks), whose context `ctx` covers the same units.
    With a KV cache (decoding), each unit attends to its cached keys and values of earlier tokens, and
    `store_kv` adds these tokens' own."""

    def __init__(self, weights: BlockWeights, ctx: Context, cache: KVCache | None = None):
        self.weights, self.ctx, self.cache = weights, ctx, cache
        x0 = ctx.x0  # (B, T, D), or (B, S, T, D) with mHC
        mixing = None
        if weights.hc_attn is not None:
            static = weights.hc_attn.dyn_proj is None
            mixing = static_mixing(weights.hc_attn, weights.hc_mlp, weights.resid).detach() if static else self._mixing
        scales = (torch.ones(weights.num_layers, dtype=x0.dtype, device=x0.device) if weights.resid is None
                  else weights.resid.detach().to(x0.dtype))  # without the blend the skip path is the identity
        super().__init__(self._outputs, weights.num_layers, mixing=mixing, stream_dim=None if mixing is None else 1,
                         scales=scales, state_shape=tuple(x0.shape), dtype=x0.dtype)

    def _run(self, units: slice, inputs: torch.Tensor, want_mixing: bool = False) -> BlockOutput:
        return block_forward(self.weights[units], inputs, self.ctx.select(units, self.cache), want_mixing)

    def jvp(self, layers: slice, inputs: torch.Tensor, tangents: torch.Tensor):
        # Forward-mode AD (exact and diagonal strategies): the fused attention kernels have no forward derivative,
        # the unfused SDPA maths has.
        with sdpa_kernel(SDPBackend.MATH):
            return super().jvp(layers, inputs, tangents)

    def _outputs(self, units: slice, inputs: torch.Tensor) -> torch.Tensor:
        return self._run(units, inputs).out

    def _mixing(self, units: slice, inputs: torch.Tensor) -> torch.Tensor:
        """Dynamic mHC: (n, B, T, 1, S, S) against states (B, S, T, D), the blocks' own per-token matrices at the
        iterate, taken as constants (their derivatives with respect to the state are dropped)."""
        return self._run(units, inputs, want_mixing=True).mixing.detach().unsqueeze(3)

    def store_kv(self, trace: torch.Tensor) -> None:
        """Store in the cache each unit's keys and values of these tokens, computed from the unit's input in
        `trace` (n+1, *state), the final iterate of a solve: later tokens then see the trace that gave the output."""
        units = slice(0, self.num_layers)
        ctx = self.ctx.select(units, self.cache)
        k, v = block_kv(self.weights, trace[:-1], ctx)
        self.cache.write(units, ctx.position, k, v)
