"""KV-cache decoding, sequential and SNLP, against full-forward greedy decoding."""

import dataclasses

import pytest
import torch

import layersolve as ls
from helpers import random_model, tiny_config, tokens
from models.inference import snlp
from models.inference.decode import Decoder, generate


def greedy_full_forward(forward, prompt, max_new):
    ids = prompt
    for _ in range(max_new):
        ids = torch.cat([ids, forward(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[:, prompt.shape[1]:]


# sequence_len 64: the short window is 128 (does not bind) but the long window is 64, so with a 40-token prompt and
# 32 new tokens the "L" layers' windows bind during decoding.
CONFIGS = {"default": dict(sequence_len=64), "mhc": dict(sequence_len=64, use_mhc=True, mhc_num_streams=2)}


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_decoding_equals_full_forward_greedy(name):
    model = random_model(tiny_config(**CONFIGS[name]), seed=1)
    prompt = tokens(2, 40, seed=1)
    expected = greedy_full_forward(model, prompt, 32)
    assert torch.equal(generate(model, prompt, 32), expected)
    jacobian = ls.Mixing() if model.config.use_mhc else ls.Identity()
    assert torch.equal(generate(model, prompt, 32, plan=snlp.Plan(n_par=4, iters=4, jacobian=jacobian)), expected)


def test_fused_snlp_decoding_equals_the_fused_model():
    model = random_model(tiny_config(sequence_len=64), seed=2)
    prompt = tokens(1, 20, seed=2)
    plan = snlp.Plan(n_par=4, fuse=2, iters=2)
    expected = greedy_full_forward(lambda ids: snlp.sequential_trace(model, ids, plan)[0], prompt, 12)
    assert torch.equal(generate(model, prompt, 12, plan=plan), expected)


def test_step_logits_equal_the_full_forward():
    model = random_model(tiny_config(sequence_len=64), seed=3)
    idx = tokens(2, 30, seed=3)
    decoder = Decoder(model, snlp.Plan(n_par=3, iters=3), capacity=30)
    pieces = [decoder.step(idx[:, :10])] + [decoder.step(idx[:, t:t + 1]) for t in range(10, 30)]
    torch.testing.assert_close(torch.cat(pieces, dim=1), model(idx), rtol=1e-10, atol=1e-10)
    assert len(decoder.stats) == 21


PROMPT_STEP_PLANS = {
    "idn_prefix": (dict(), snlp.Plan(n_par=4, iters=1)),
    "fused": (dict(), snlp.Plan(n_par=6, fuse=3, iters=1, jacobian=ls.Scaled())),
    "hcn_mhc": (dict(use_mhc=True, mhc_num_streams=2), snlp.Plan(n_par=3, iters=2, jacobian=ls.Mixing())),
}


@pytest.mark.parametrize("name", PROMPT_STEP_PLANS)
def test_the_prompt_step_is_the_snlp_forward(name):
    """With an empty cache a step is the plan's forward over its tokens, also at K < n_par (the "L" windows of 64
    tokens bind over the 72-token prompt)."""
    overrides, plan = PROMPT_STEP_PLANS[name]
    model = random_model(tiny_config(sequence_len=64, **overrides), seed=6)
    prompt = tokens(2, 72, seed=6)
    logits = Decoder(model, plan, capacity=80).step(prompt)
    torch.testing.assert_close(logits, snlp.forward(model, prompt, plan).logits, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("plan", [snlp.Plan(n_par=4, iters=1), snlp.Plan(n_par=4, iters=2),
                                  snlp.Plan(n_par=4, fuse=2, iters=1), snlp.Plan(n_par=4, iters=None, tol=0.4)],
                         ids=["K1", "K2", "2xF2 K1", "tol"])  # tol 0.4: this model converges there at K = 2
def test_the_tail_cache_holds_the_final_iterates_keys_and_values(plan):
    """The tail's evaluations write their keys and values in place, and the decoder keeps those of the units whose
    inputs were already final at the solve's last evaluation (the first K, or all with a tolerance): whichever it
    keeps, the cache must equal the keys and values of each unit's input in the final iterate."""
    from models.nanochat.block import block_kv

    model = random_model(tiny_config(sequence_len=64), seed=3)
    ids = tokens(2, 12, seed=3)
    decoder = Decoder(model, plan, capacity=12)
    decoder.step(ids)
    tail = snlp.prepare(model, model.embed(ids), plan)
    trace = tail.solve().trace
    assert tail.solve().stats.iterations < plan.n_par // plan.fuse  # below K = n_par, where every input is final
    k, v = block_kv(tail.system.weights, trace[:-1], tail.system.ctx.select(slice(0, trace.shape[0] - 1)))
    torch.testing.assert_close(decoder.segment.k, k, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(decoder.segment.v, v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fuse", [1, 2])
def test_a_later_step_sees_the_earlier_tokens_final_iterate(fuse):
    """Decoding defines the cache as the keys and values of each unit's input in the final iterate. So at K = 1 a
    later step computes what the forward over the whole sequence computes for its tokens when the solve starts the
    earlier tokens at their final iterate and the new ones at repeat (IDN's update is per token). At K > 1 the
    whole-sequence solve would move the earlier tokens on, which decoding by definition does not."""
    model = random_model(tiny_config(sequence_len=64), seed=7)
    ids = tokens(2, 30, seed=7)
    plan = snlp.Plan(n_par=4, fuse=fuse, iters=1)
    decoder = Decoder(model, plan, capacity=30)
    decoder.step(ids[:, :26])
    later = decoder.step(ids[:, 26:])
    earlier = snlp.prepare(model, model.embed(ids[:, :26]), plan)
    final = earlier.solve().trace  # (C + 1, B, 26, D)
    whole = snlp.prepare(model, model.embed(ids), plan)
    guess = whole.prefix[-1].expand(final.shape[0], *whole.prefix[-1].shape).clone()
    guess[:, :, :26] = final
    expected = snlp.forward(model, ids, dataclasses.replace(plan, init=ls.Given(guess))).logits[:, 26:]
    torch.testing.assert_close(later, expected, rtol=1e-12, atol=1e-12)
    assert (later - snlp.forward(model, ids, plan).logits[:, 26:]).abs().max() > 1e-3  # not the plain forward


@pytest.mark.parametrize("name", CONFIGS)
def test_warm_decoding_at_k_equals_n_par_is_sequential_decoding(name):
    model = random_model(tiny_config(**CONFIGS[name]), seed=11)
    prompt = tokens(2, 24, seed=11)
    jacobian = ls.Mixing() if model.config.use_mhc else ls.Identity()
    plan = snlp.Plan(n_par=4, iters=4, jacobian=jacobian, init="warm")
    assert torch.equal(generate(model, prompt, 16, plan=plan), generate(model, prompt, 16))


def test_warm_steps_start_from_the_previous_tokens_trace():
    """A warm step is the solve from the previous step's final trace at its last token: at K = 1 its logits are
    those of a step given that guess, and differ from repeat's."""
    model = random_model(tiny_config(sequence_len=64), seed=12)
    ids = tokens(2, 21, seed=12)
    warm, plain = Decoder(model, snlp.Plan(n_par=4, iters=1, init="warm")), Decoder(model, snlp.Plan(n_par=4, iters=1))
    torch.testing.assert_close(warm.step(ids[:, :20]), plain.step(ids[:, :20]), rtol=0, atol=0)  # prompt: repeat
    given = Decoder(model, snlp.Plan(n_par=4, iters=1))
    given.step(ids[:, :20])
    given.plan = dataclasses.replace(given.plan, init=ls.Given(warm.last_trace))  # (n_par + 1, B, 1, D)
    logits = warm.step(ids[:, 20:])
    torch.testing.assert_close(logits, given.step(ids[:, 20:]), rtol=1e-12, atol=1e-12)
    assert (logits - plain.step(ids[:, 20:])).abs().max() > 1e-6  # the guess matters at K = 1


def test_the_warm_guess_is_the_last_tokens_trace():
    model = random_model(tiny_config(sequence_len=64), seed=14)
    prompt = tokens(2, 12, seed=14)
    decoder = Decoder(model, snlp.Plan(n_par=4, iters=4, init="warm"))  # K = n_par: the final trace is exact
    decoder.step(prompt)
    exact = torch.stack(model.trace(model.embed(prompt))[2:])  # h_2 .. h_6, (5, B, T, D)
    torch.testing.assert_close(decoder.last_trace, exact[:, :, -1:], rtol=1e-12, atol=1e-12)


def test_warm_is_for_decoding():
    model = random_model(tiny_config(), seed=13)
    with pytest.raises(ValueError, match="init='warm'.*decoding"):
        snlp.forward(model, tokens(1, 8, seed=13), snlp.Plan(n_par=2, init="warm"))


def test_sampling_is_seeded():
    model = random_model(tiny_config(sequence_len=64), seed=4)
    prompt = tokens(1, 5, seed=4)
    runs = [generate(model, prompt, 10, temperature=1.0, top_k=5, seed=s) for s in (0, 0, 1)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("context", [torch.enable_grad, torch.no_grad, torch.inference_mode])
def test_decoding_runs_in_inference_mode_whatever_the_callers_context(context):
    """generate picks the fast context itself: under no_grad, or with grad enabled, it still runs in inference mode
    (its tokens and the decoder's caches are inference tensors) and builds no graph."""
    model = random_model(tiny_config(sequence_len=64), seed=4)
    with context():
        out = generate(model, tokens(1, 8, seed=4), 4, plan=snlp.Plan(n_par=3, iters=1))
        decoder = Decoder(model, snlp.Plan(n_par=3, iters=1), capacity=9)
        logits = decoder.step(tokens(1, 9, seed=5))
    assert out.is_inference() and logits.is_inference() and not logits.requires_grad
    assert decoder.segment.k.is_inference()


def test_bad_arguments():
    model = random_model(tiny_config(sequence_len=64), seed=5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, torch.tensor([[100]]), 3)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(model, tokens(1, 3), 3, temperature=-1.0)
    decoder = Decoder(model, capacity=4)
    decoder.step(tokens(1, 4))
    with pytest.raises(ValueError, match="past the cache capacity of 4 tokens"):
        decoder.step(tokens(1, 1))


@pytest.mark.parametrize("plan", [None, snlp.Plan(n_par=4, iters=1), snlp.Plan(n_par=4, fuse=2, iters=2)],
                         ids=["sequential", "IDN K1", "2xF2 K2"])
def test_static_caches_decode_the_same_logits(plan):
    """A static cache attends to its whole capacity under a mask and writes at a tensor of positions; the logits
    of every step are those of the dynamic cache (windows bind: the prompt and the new tokens pass the short
    window)."""
    model = random_model(tiny_config(sequence_len=16), seed=4)
    ids = tokens(2, 28, seed=4)
    dynamic, static = Decoder(model, plan, capacity=28), Decoder(model, plan, capacity=28, static=True)
    for chunk in (ids[:, :20], ids[:, 20:21], ids[:, 21:24], ids[:, 24:25]):
        torch.testing.assert_close(static.step(chunk), dynamic.step(chunk), rtol=1e-12, atol=1e-12)


def test_a_static_decoding_step_compiles_once():
    """With compiled blocks and static caches, steps after the first token's reuse its graphs: the cache length
    is no new shape and the position no new constant."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # this test's graphs alone
    model = random_model(tiny_config(sequence_len=32), seed=5, dtype=torch.float32).compile_blocks()
    prompt = tokens(1, 6, seed=5)
    decoder = Decoder(model, snlp.Plan(n_par=2, iters=1), capacity=16, static=True)
    counters.clear()
    decoder.step(prompt)
    step = decoder.step(prompt[:, -1:])
    assert counters["stats"]["unique_graphs"] > 0  # the prompt's and the first token's shapes compiled
    counters.clear()
    for i in range(3):
        step = decoder.step(step[:, -1].argmax(-1, keepdim=True))
    assert counters["stats"]["unique_graphs"] == 0
    eager = random_model(tiny_config(sequence_len=32), seed=5, dtype=torch.float32)
    expected = generate(eager, prompt, 5, plan=snlp.Plan(n_par=2, iters=1))
    assert torch.equal(Decoder(model, snlp.Plan(n_par=2, iters=1), capacity=16, static=True).generate(prompt, 5),
                       expected)
