"""Self-speculative decoding: greedy output equals sequential greedy decoding token for token; sampled output has
the sequential model's distribution; bad arguments are refused by name."""

import re

import pytest
import scipy.stats
import torch

import layersolve as ls
from helpers import random_model, tiny_config, tokens
from models.inference import snlp, speculative
from models.inference.decode import generate

PLANS = {
    "IDN": (dict(), snlp.Plan(n_par=4, iters=1)),
    "IDN warm": (dict(), snlp.Plan(n_par=4, iters=1, init="warm")),
    "Jacobi": (dict(), snlp.Plan(n_par=4, jacobian=ls.Zero(), iters=1)),
    "fused": (dict(), snlp.Plan(n_par=4, fuse=2, iters=1)),
    "mHC HCN": (dict(use_mhc=True, mhc_num_streams=2), snlp.Plan(n_par=4, jacobian=ls.Mixing(), iters=1)),
}


@pytest.mark.parametrize("name", PLANS)
@pytest.mark.parametrize("draft_len", [1, 3, 4])
def test_greedy_output_is_sequential_greedy_decoding(name, draft_len):
    options, plan = PLANS[name]
    # scale 0.4: blocks nonlinear enough that K = 1 drafts are rejected now and then, so rollbacks are exercised
    model = random_model(tiny_config(sequence_len=128, **options), seed=1, scale=0.4)
    prompt = tokens(1, 20, seed=1)
    out, stats = speculative.generate(model, prompt, 64, plan, draft_len=draft_len)
    assert torch.equal(out, generate(model, prompt, 64))
    assert stats.tokens == 64 and stats.rounds == len(stats.accepted_lengths)
    assert stats.accepted <= stats.drafted and 1 <= stats.mean_accepted_length <= draft_len


@pytest.mark.parametrize("context", [torch.enable_grad, torch.no_grad])
def test_speculative_decoding_runs_in_inference_mode_whatever_the_callers_context(context):
    model = random_model(tiny_config(sequence_len=64), seed=2)
    with context():
        out, _ = speculative.generate(model, tokens(1, 8, seed=2), 6, snlp.Plan(n_par=2, iters=1), draft_len=2)
    assert out.is_inference()


def test_some_drafts_are_rejected_in_the_greedy_tests():
    """The greedy identity above is only a test of rollbacks if some rounds reject: they do, for Jacobi."""
    options, plan = PLANS["Jacobi"]
    model = random_model(tiny_config(sequence_len=128, **options), seed=1, scale=0.4)
    _, stats = speculative.generate(model, tokens(1, 20, seed=1), 64, plan, draft_len=4)
    assert 0 < stats.acceptance_rate < 1


V = 6  # vocabulary of the distribution test: 36 cells for the first two tokens


def _joint(model, prompt):
    """The sequential model's probabilities of the first two sampled tokens, (V, V), at temperature 1."""
    with torch.no_grad():
        first = torch.softmax(model(prompt)[0, -1].double(), -1)
        ids = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], dim=1)
        second = torch.softmax(model(ids)[:, -1].double(), -1)
    return first[:, None] * second


def _chi_square_p_value(model, prompt, plan, samples):
    counts = torch.zeros(V, V, dtype=torch.float64)
    for seed in range(samples):
        out, _ = speculative.generate(model, prompt, 2, plan, draft_len=2, temperature=1.0, seed=seed)
        counts[out[0, 0], out[0, 1]] += 1
    expected, observed = _pooled(samples * _joint(model, prompt), counts)
    # Pearson's statistic against the model's probabilities, len(expected) - 1 degrees of freedom
    return float(scipy.stats.chisquare(observed.numpy(), expected.numpy()).pvalue)


def _pooled(expected, other):
    """The cells with an expected count of at least 5, and one cell pooling the rest (the chi-square
    approximation needs such counts; the model's next-token distribution is peaked): expected and `other`."""
    expected, other = expected.flatten(), other.flatten()
    big = expected >= 5
    return (torch.cat([expected[big], expected[~big].sum()[None]]), torch.cat([other[big], other[~big].sum()[None]]))


SAMPLES = 400
ALPHA = 1e-3


def _setup():
    model = random_model(tiny_config(vocab_size=V, n_layer=4, n_embd=32, n_head=1), seed=3, scale=0.3)
    # A poor draft on purpose (Jacobi, one iteration over every layer): its distribution is far from the model's,
    # so "always accept" is detectable and the accept / resample rule does real work.
    return model, torch.tensor([[1, 4, 2]]), snlp.Plan(n_par=4, jacobian=ls.Zero(), iters=1)


def test_the_draft_is_far_enough_for_power():
    """Power of the test below against "always accept", which samples the draft's own distribution q: the
    statistic is then about noncentral chi-square with lambda = N sum (q - p)^2 / p over the pooled cells. With
    lambda >= 60 at up to 36 degrees of freedom and alpha = 1e-3 (critical value <= 67.98), the power is above
    0.9 (mean dof + lambda, standard deviation sqrt(2 (dof + 2 lambda)))."""
    model, prompt, plan = _setup()
    with torch.no_grad():
        first_q = torch.softmax(snlp.forward(model, prompt, plan).logits[0, -1].double(), -1)
        ids = torch.cat([prompt.expand(V, -1), torch.arange(V)[:, None]], dim=1)
        second_q = torch.softmax(snlp.forward(model, ids, plan).logits[:, -1].double(), -1)
    # (the drafted second token comes from a draft step on the verified cache, which this forward approximates)
    p, q = _pooled(SAMPLES * _joint(model, prompt), SAMPLES * first_q[:, None] * second_q)
    noncentrality, dof = float(((q - p) ** 2 / p).sum()), len(p) - 1
    assert noncentrality >= 60
    # the same power without the normal approximation: noncentral chi-square beyond the critical value (scipy)
    assert scipy.stats.ncx2.sf(scipy.stats.chi2.isf(ALPHA, dof), dof, noncentrality) > 0.9


def test_sampled_tokens_have_the_sequential_distribution():
    model, prompt, plan = _setup()
    assert _chi_square_p_value(model, prompt, plan, SAMPLES) > ALPHA


def test_always_accepting_fails_the_distribution_test(monkeypatch):
    model, prompt, plan = _setup()
    monkeypatch.setattr(speculative, "accepts", lambda u, p, q: True)
    assert _chi_square_p_value(model, prompt, plan, SAMPLES) < ALPHA


@pytest.mark.parametrize("change, message", [
    (dict(draft_len=0), "draft_len (B) must be an int >= 1"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(max_new=200), "exceed the cache capacity of 128 tokens"),
])
def test_bad_arguments_are_refused_by_name(change, message):
    model = random_model(tiny_config(sequence_len=128), seed=1)
    decoder = speculative.SpeculativeDecoder(model, snlp.Plan(n_par=4), capacity=128)
    args = dict(prompt=tokens(1, 20), max_new=8, draft_len=2, temperature=0.0, top_k=None) | change
    with pytest.raises(ValueError, match=re.escape(message)):
        decoder.generate(**args)


def test_a_plan_that_does_not_fit_and_a_batch_are_refused():
    model = random_model(tiny_config(sequence_len=128), seed=1)
    with pytest.raises(ValueError, match="n_par must be an int in"):
        speculative.SpeculativeDecoder(model, snlp.Plan(n_par=7))
    with pytest.raises(ValueError, match=r"prompt must be one sequence"):
        speculative.generate(model, tokens(2, 5), 4, snlp.Plan(n_par=2))
