"""The prepared store of a model: stacked weights built once for inference, never stale, never in training's way."""

import copy
import dataclasses

import pytest
import torch

import layersolve as ls
from helpers import random_model, tiny_config, tokens
from models import snlp
from models.inference.decode import generate

PLAN = snlp.Plan(n_par=4, jacobian=ls.Identity(), iters=2, fuse=2)


def test_inference_reuses_the_segment_weights():
    model = random_model(tiny_config(), seed=1)
    idx = tokens(2, 16, seed=1)
    with torch.no_grad():
        snlp.forward(model, idx, PLAN)
        first = model.segment_weights(2, 2)
        snlp.forward(model, idx, PLAN)
        assert model.segment_weights(2, 2) is first


def test_a_weight_update_invalidates_what_was_prepared():
    """An in-place update (an optimizer step, load_state_dict) leaves the parameters where they are: only their
    version counters move, and the next forward must see the new weights."""
    model = random_model(tiny_config(), seed=2)
    twin = copy.deepcopy(model)
    idx = tokens(2, 16, seed=2)
    with torch.no_grad():
        snlp.forward(model, idx, PLAN)
        for p, q in zip(model.parameters(), twin.parameters()):
            p.mul_(1.1), q.mul_(1.1)
        torch.testing.assert_close(snlp.forward(model, idx, PLAN).logits, snlp.forward(twin, idx, PLAN).logits,
                                   rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(model(idx), twin(idx), rtol=1e-12, atol=1e-12)


def test_moving_the_model_invalidates_what_was_prepared():
    model = random_model(tiny_config(), seed=3)
    idx = tokens(1, 16, seed=3)
    with torch.no_grad():
        snlp.forward(model, idx, PLAN)
        model.float()
        out = snlp.forward(model, idx, PLAN).logits
    assert out.dtype == torch.float32 and model.segment_weights(2, 2).attn.c_q.dtype == torch.float32


def test_a_model_built_in_inference_mode_is_refused_with_a_reason():
    """Its parameters are inference tensors, without the version counter that tells the store of a change."""
    with torch.inference_mode():
        model = random_model(tiny_config(), seed=3)
        with pytest.raises(ValueError, match="parameters are inference tensors .* build and load it outside"):
            model(tokens(1, 8))


def test_training_builds_fresh_weights_that_carry_the_gradient():
    model = random_model(tiny_config(), seed=4).requires_grad_(True)
    idx = tokens(2, 16, seed=4)
    with torch.inference_mode():
        snlp.forward(model, idx, PLAN)  # prepared in inference mode: must not leak into autograd
    stored = len(model.prepared)
    loss = snlp.forward(model, idx, PLAN).logits.square().mean()
    loss.backward()
    assert len(model.prepared) == stored  # nothing stored with grad enabled
    assert model.transformer.h[5].attn.c_q.weight.grad.abs().sum() > 0
    with torch.no_grad():
        snlp.forward(model, idx, PLAN)  # after the inference-mode entries, no_grad builds its own


def test_prepared_and_fresh_weights_compute_the_same_function():
    """Inference projects q, k, v with one matmul of the prepared concatenation; training with three."""
    model = random_model(tiny_config(), seed=5).requires_grad_(True)
    idx = tokens(2, 16, seed=5)
    fresh = snlp.forward(model, idx, PLAN).logits, model(idx)
    with torch.no_grad():
        prepared = snlp.forward(model, idx, PLAN).logits, model(idx)
        assert model.segment_weights(2, 2).attn.c_qkv is not None
    for a, b in zip(fresh, prepared):
        torch.testing.assert_close(a.detach(), b, rtol=1e-12, atol=1e-12)


def _suite_plans(layers: int) -> list[snlp.Plan]:
    from models.tools import suite

    return suite.prefill_plans(layers) + suite.decode_plans(layers)


@pytest.mark.parametrize("plan", _suite_plans(8), ids=lambda p: f"n{p.n_par} K{p.iters} F{p.fuse} {p.init}")
def test_every_suite_plan_gives_the_plain_paths_logits_on_the_fast_path(monkeypatch, plan):
    """The fast path (inference: prepared one-matmul QKV, the tail in CPU cache-sized groups, decoding's in-place
    caches) against the plain path (grad enabled: fresh weights, three projections, one batched call), in float32
    at the suite's shapes scaled down: float32 rounding of reordered sums, ~1e-6 relative, bounds the difference."""
    from models.inference.decode import generate
    from models.nanochat import system

    model = random_model(tiny_config(n_layer=8, sequence_len=64), seed=6, dtype=torch.float32).requires_grad_(True)
    idx = tokens(1, 24, seed=6)
    forward = model if plan.init == "warm" else (lambda ids: snlp.forward(model, ids, plan).logits)  # warm: decoding
    plain = forward(idx)
    monkeypatch.setattr(system, "CPU_GROUP_BYTES", 1)  # force the grouped evaluation at this small shape
    with torch.no_grad():
        torch.testing.assert_close(forward(idx), plain.detach(), rtol=1e-5, atol=1e-5)
        if plan.fuse == 1:  # at K = n_par the fast decoding path gives exactly sequential decoding's tokens
            exact = dataclasses.replace(plan, iters=plan.n_par)
            assert torch.equal(generate(model, idx[:, :8], 8, plan=exact), generate(model, idx[:, :8], 8))


def test_compiled_blocks_give_the_eager_logits():
    """GPT.compile_blocks routes the sequential forward and the SNLP forward's blocks through torch.compile; the
    logits stay the eager ones to float32 rounding (inductor reorders reductions)."""
    model = random_model(tiny_config(n_layer=4), seed=8, dtype=torch.float32)
    idx = tokens(1, 16, seed=8)
    plan = snlp.Plan(n_par=2, iters=1)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # count this test's graphs alone: other tests' compiled blocks of the same shapes
    with torch.no_grad():
        eager = model(idx), snlp.forward(model, idx, plan).logits
        model.compile_blocks()
        counters.clear()
        compiled = [model(idx)]
        sequential_graphs = counters["stats"]["unique_graphs"]
        compiled.append(snlp.forward(model, idx, plan).logits)
    # the blocks compiled, and the tail's call of two units at once compiled graphs of its own
    assert 0 < sequential_graphs < counters["stats"]["unique_graphs"]
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_the_compiled_forward_is_one_graph(context):
    """torch.compile of the whole model (the bench's "sequential compiled" baseline) traces the forward without a
    graph break once its weights are prepared: a break splits it into per-block frames, each recompiled per layer,
    which past the recompile limit run eagerly."""
    model = random_model(tiny_config(n_layer=4), seed=9, dtype=torch.float32)
    idx = tokens(1, 16, seed=9)
    with context():
        model(idx)  # prepares the weights, as the bench's eager reference call does
        explained = torch._dynamo.explain(model)(idx)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_long_rows_keeps_the_values_and_makes_the_longer_side_contiguous():
    from models.nanochat.block import long_rows

    wide = torch.randn(3, 8, 4, dtype=torch.float64)  # (n, out, in) with out > in: stored input-major
    laid = long_rows(wide)
    assert laid.shape == wide.shape and torch.equal(laid, wide)
    assert laid.transpose(-1, -2).is_contiguous() and not laid.is_contiguous()
    narrow = torch.randn(3, 4, 8, dtype=torch.float64)
    assert long_rows(narrow) is narrow  # out <= in: already contiguous along its longer side


def test_decoding_weights_on_the_cpu_are_stored_with_long_rows():
    """What a decoding step multiplies by a vector, laid out by `long_rows`: the QKV and c_fc projections and the
    lm_head (wider outputs than inputs) input-major, the output projections as they are. A prefill keeps the
    parameters' layout."""
    model = random_model(tiny_config(), seed=9)
    with torch.no_grad():
        model(tokens(1, 2, seed=9))  # the store's first refresh empties it
        for vectors in (True, False):
            for w in (model.block_weights(slice(0, 1), vectors), model.segment_weights(2, 2, vectors=vectors)):
                if vectors:
                    assert w.attn.c_qkv.transpose(-1, -2).is_contiguous()
                    assert w.mlp.c_fc.transpose(-1, -2).is_contiguous()
                else:
                    assert w.attn.c_qkv.is_contiguous() and w.mlp.c_fc.is_contiguous()
                assert w.mlp.c_proj.is_contiguous()
        head = model._head_weight(True)
        assert head.transpose(-1, -2).is_contiguous() and model._head_weight(False) is model.lm_head.weight
        torch.testing.assert_close(head, model.lm_head.weight, rtol=0, atol=0)


def test_decoding_steps_use_the_vector_layout_and_prefills_the_parameters(monkeypatch):
    from models.nanochat import gpt

    built, prepare = [], gpt.for_inference
    monkeypatch.setattr(gpt, "for_inference", lambda w, vectors: built.append(vectors) or prepare(w, vectors))
    model = random_model(tiny_config(), seed=9)
    with torch.no_grad():
        generate(model, tokens(1, gpt.VECTOR_ROWS, seed=9), 2, plan=PLAN)
        assert built and all(built)
        built.clear()
        snlp.forward(model, tokens(1, gpt.VECTOR_ROWS + 1, seed=9), PLAN)
        assert built and not any(built)


def test_keys_and_values_alone_are_those_of_the_whole_block():
    """block_kv (a decoding cache's recompute) projects only keys and values, from the prepared QKV's rows after
    the queries': with grouped-query attention (more query heads than key heads) the offset matters."""
    from models.nanochat.block import block_forward, block_kv

    model = random_model(tiny_config(), seed=10)
    emb = model.embed(tokens(2, 6, seed=10))
    h = torch.randn(4, *emb.x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        weights = model.segment_weights(2)
        assert weights.attn.c_q.shape[1] != weights.attn.c_k.shape[1]
        ctx = emb.context(2).select(slice(0, 4))
        whole = block_forward(weights, h, ctx)
        k, v = block_kv(weights, h, ctx)
    torch.testing.assert_close(k, whole.k, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(v, whole.v, rtol=1e-12, atol=1e-12)
