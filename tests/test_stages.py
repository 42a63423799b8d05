"""models.inference.stages: the stage-level system of a model split into P stages, solved by layersolve."""

import pytest
import torch

import layersolve as ls
from helpers import random_model, tiny_config, tokens
from models.inference import snlp
from models.inference.stages import StageSystem

L = 8  # the backout state (output of block L // 2 + 1 = 5) lies inside a stage for P = 2 and 4


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(n_layer=L), seed=3)


@pytest.fixture(scope="module")
def idx():
    return tokens(2, 16, seed=3)


@pytest.mark.parametrize("stages", [2, 4, 8])
@pytest.mark.parametrize("jacobian", [ls.Identity(), ls.Zero()], ids=repr)
def test_p_iterations_reproduce_the_sequential_logits(model, idx, stages, jacobian):
    system = StageSystem(model, model.embed(idx), stages)
    sol = ls.solve(system, system.h0, ls.Newton(jacobian=jacobian), iters=stages)
    torch.testing.assert_close(system.logits(sol.trace), model(idx), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stages", [2, 4])
def test_the_sequential_stage_trace_is_the_block_trace_at_stage_boundaries(model, idx, stages):
    emb = model.embed(idx)
    system = StageSystem(model, emb, stages)
    blocks = model.trace(emb)
    assert all(torch.equal(x, blocks[c * (L // stages)]) for c, x in enumerate(system.sequential(system.h0)))


def test_below_p_only_the_first_k_stages_are_exact(model, idx):
    """Finite termination over stages: after K = 1 of P = 4 IDN iterations stage 1 is exact, stages 2-4 are not."""
    system = StageSystem(model, model.embed(idx), 4)
    reference = system.sequential(system.h0)
    sol = ls.solve(system, system.h0, ls.Newton(jacobian=ls.Identity()), iters=1, reference=reference)
    error = sol.stats.error[-1]
    assert error[0] < 1e-12 and error[1:].min() > 1e-6


def test_one_block_per_stage_is_the_block_level_system(model, idx):
    """With M = 1 the stage system is the block system: IDN K = 1 over P = L stages equals SNLP's IDN n = L K = 1."""
    system = StageSystem(model, model.embed(idx), L)
    sol = ls.solve(system, system.h0, ls.Newton(jacobian=ls.Identity()), iters=1)
    out = snlp.forward(model, idx, snlp.Plan(n_par=L, jacobian=ls.Identity(), iters=1))
    torch.testing.assert_close(system.logits(sol.trace), out.logits, rtol=1e-10, atol=1e-10)


def test_stages_that_do_not_divide_the_layers_are_refused(model, idx):
    with pytest.raises(ValueError, match=r"stages=3 must divide the model's 8 layers into equal stages: one of "
                                         r"\[1, 2, 4, 8\]"):
        StageSystem(model, model.embed(idx), 3)
