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

# On the CPU, a batched evaluation of many units at many tokens spills the caches: each unit's MLP hidden state
# (B, T, 4D) alone is 2 MiB at T = 512, D = 256. Units are evaluated in groups whose hidden states fit in about the
# L2 caches of a server core pair; measured at L24 D256 T512, IDN n12 K1: 153 ms in one batch, 125 ms in groups of
# 4, beside 122 ms for the sequential forward. GPUs take the whole batch.
CPU_GROUP_BYTES = 8 * 2**20


class BlockSystem(ls.LayerSystem):
    """The system of the n units of `weights` (blocks, or fused chunks), whose context `ctx` covers the same units.
    With a KV cache (decoding), each unit attends to its cached keys and values of earlier tokens, and
    `store_kv` adds these tokens' own. `forward` evaluates units: block_forward, or a compiled version of it
    (JVPs always run the eager one)."""

    def __init__(self, weights: BlockWeights, ctx: Context, cache: KVCache | None = None, forward=block_forward):
        self.weights, self.ctx, self.cache, self.forward = weights, ctx, cache, forward
        self._slices: dict[tuple[int, int], BlockWeights] = {}  # weights of unit ranges, sliced once per system
        x0 = ctx.x0  # (B, T, D), or (B, S, T, D) with mHC
        mixing = None
        if weights.hc_attn is not None:
            static = weights.hc_attn.dyn_proj is None
            mixing = static_mixing(weights.hc_attn, weights.hc_mlp, weights.resid).detach() if static else self._mixing
        scales = (torch.ones(weights.num_layers, dtype=x0.dtype, device=x0.device) if weights.resid is None
                  else weights.resid.detach().to(x0.dtype))  # without the blend the skip path is the identity
        super().__init__(self._outputs, weights.num_layers, mixing=mixing, stream_dim=None if mixing is None else 1,
                         scales=scales, state_shape=tuple(x0.shape), dtype=x0.dtype)

    def _run(self, units: slice, inputs: torch.Tensor, want_mixing: bool = False, writes: bool = True,
             forward=None) -> BlockOutput:
        """The units' block evaluation, by the system's `forward` (block_forward, or a compiled version of it)."""
        forward = self.forward if forward is None else forward
        return forward(self._weights(units), inputs, self.ctx.select(units, self.cache, writes), want_mixing)

    def _weights(self, units: slice) -> BlockWeights:
        key = units.indices(self.num_layers)[:2]
        if key == (0, self.num_layers):  # the prepared weights themselves, with their window bounds read once
            return self.weights
        if key not in self._slices:
            self._slices[key] = self.weights[units]
        return self._slices[key]

    def jvp(self, layers: slice, inputs: torch.Tensor, tangents: torch.Tensor):
        # Forward-mode AD (exact and diagonal strategies): the fused attention kernels have no forward derivative,
        # the unfused SDPA maths has; and a transform cannot write the KV cache in place.
        with sdpa_kernel(SDPBackend.MATH):
            return torch.func.jvp(lambda x: self._run(layers, x, writes=False, forward=block_forward).out,
                                  (inputs.contiguous(),), (tangents,))

    def _outputs(self, units: slice, inputs: torch.Tensor) -> torch.Tensor:
        """The units' outputs. Each evaluation also writes the units' keys and values at its inputs into the cache
        (decoding), which `store_kv` keeps where they are the final iterate's."""
        group = self._group(inputs)
        if group >= inputs.shape[0]:
            return self._run(units, inputs).out
        return torch.cat([self._run(slice(units.start + i, units.start + i + group), inputs[i:i + group]).out
                          for i in range(0, inputs.shape[0], group)])

    def _group(self, inputs: torch.Tensor) -> int:
        """How many units one call evaluates: all of them on a GPU, on the CPU as many as CPU_GROUP_BYTES allows."""
        if inputs.device.type != "cpu":
            return inputs.shape[0]
        hidden = self.weights.mlp.c_fc.shape[1]
        per_unit = inputs[0].numel() // inputs.shape[-1] * hidden * inputs.element_size()
        return max(1, CPU_GROUP_BYTES // per_unit)

    def _mixing(self, units: slice, inputs: torch.Tensor) -> torch.Tensor:
        """Dynamic mHC: (n, B, T, 1, S, S) against states (B, S, T, D), the blocks' own per-token matrices at the
        iterate, taken as constants (their derivatives with respect to the state are dropped)."""
        return self._run(units, inputs, want_mixing=True, writes=False).mixing.detach().unsqueeze(3)

    def store_kv(self, trace: torch.Tensor, start: int = 0) -> None:
        """Make the cache hold each unit's keys and values of these tokens at the unit's input in `trace`
        (n+1, *state), the final iterate of a solve, so that later tokens see the trace that gave the output.

        The units before `start` keep what the solve's last evaluation wrote: the caller knows their inputs were
        already final there (the first K units after K iterations, by finite termination; every unit when the
        solve's last evaluation was at the final iterate, as with a tolerance). The rest are computed here."""
        if start >= self.num_layers:
            return
        units = slice(start, self.num_layers)
        ctx = self.ctx.select(units, self.cache)
        k, v = block_kv(self._weights(units), trace[start:-1], ctx)
        self.cache.write(units, ctx.position, k, v)
