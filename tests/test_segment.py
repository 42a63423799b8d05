"""A parallel segment in the middle of the model (snlp.Plan(start=s)): blocks 0 .. s - 1 sequential, blocks
s .. s + n - 1 solved in parallel, blocks s + n .. L - 1 sequential again; on nanochat and on tiny random Llama,
Qwen3 and Gemma3 models, float64. Each test places the segment by an independent reference (the model's own
sequential trace, cut at s), so a segment shifted by a layer at inference fails them."""

import pytest
import torch

import layersolve as ls
from helpers import HF_VOCAB, random_model, tiny_config, tiny_hf_lm, tokens
from models import hf, snlp
from models.inference.decode import generate
from models.inference.speculative import generate as speculate

L = 8
# (start, n_par) segments of the 8 blocks, none of them the tail: nanochat's backout state (h_5, the output of
# block 4) lies after, inside and before the segment.
SEGMENTS = [(1, 3), (3, 3), (5, 2)]
MODELS = ["nanochat", "llama", "qwen3", "gemma3"]
PROMPT, NEW = 12, 6


@pytest.fixture(scope="module", params=MODELS)
def model(request):
    if request.param == "nanochat":
        return random_model(tiny_config(n_layer=L, vocab_size=HF_VOCAB), seed=3)
    pytest.importorskip("transformers")
    return hf.HFModel(tiny_hf_lm(request.param, layers=L, seed=3))


@pytest.fixture(scope="module")
def idx():
    return tokens(2, PROMPT, vocab=HF_VOCAB, seed=5)


def exact_trace(model, idx) -> list[torch.Tensor]:
    """h_0 .. h_L of the model run one block after another."""
    return model.trace(model.embed(idx))


@pytest.mark.parametrize("start, n", SEGMENTS)
@torch.no_grad()
def test_k_equal_n_gives_the_models_logits(model, idx, start, n):
    expected = model(idx)
    for jacobian in (ls.Identity(), ls.Zero(), ls.Diagonal(probes=2)):
        out = snlp.forward(model, idx, snlp.Plan(n_par=n, jacobian=jacobian, iters=n, start=start))
        assert out.result.ok and (out.logits - expected).abs().max() < 1e-10, type(jacobian).__name__


@pytest.mark.parametrize("start, n", SEGMENTS)
@torch.no_grad()
def test_below_k_equal_n_the_segments_exact_prefix_grows_one_layer_per_iteration(model, idx, start, n):
    exact = torch.stack(exact_trace(model, idx)[start:start + n + 1])  # h_s .. h_{s+n}
    for k in range(1, n):
        plan = snlp.Plan(n_par=n, iters=k, start=start)
        trace = snlp.prepare(model, model.embed(idx), plan).solve().trace
        errors = (trace - exact).flatten(1).abs().amax(dim=1)
        assert errors[:k + 1].max() < 1e-10 and errors[k + 1] > 1e-8, (k, errors.tolist())
        assert (snlp.forward(model, idx, plan).logits - model(idx)).abs().max() > 1e-8  # not exact below n


@pytest.mark.parametrize("start, n", SEGMENTS)
@torch.no_grad()
def test_idn_k1_logits_are_the_suffix_and_head_of_the_prefix_summed_segment(model, idx, start, n):
    """IDN from repeat, K = 1: h_{s+j} = h_s + sum_{i<j} (f_{s+i}(h_s) - h_s); then the suffix blocks run
    sequentially from h_{s+n}, and the head reads the last state (and nanochat's backout state, wherever it is)."""
    emb = model.embed(idx)
    states = exact_trace(model, idx)[:start + 1]  # h_0 .. h_s, exact
    h = states[-1]
    steps = [model.trace(emb, start + i + 1, start=start + i, state=h)[-1] - h for i in range(n)]
    states += [h + sum(steps[:j]) for j in range(1, n + 1)]  # h_{s+1} .. h_{s+n}
    states += model.trace(emb, start=start + n, state=states[-1])[1:]  # h_{s+n+1} .. h_L
    expected = model.head(states[-1], states[model.backout_layer])
    out = snlp.forward(model, idx, snlp.Plan(n_par=n, iters=1, start=start))
    assert (out.logits - expected).abs().max() < 1e-10


@pytest.mark.parametrize("start, n", SEGMENTS)
@torch.no_grad()
def test_decoding_at_k_equal_n_gives_the_forwards_greedy_tokens(model, idx, start, n):
    prompt = idx[:1]
    text = prompt
    for _ in range(NEW):  # greedy decoding by the model's forward over the whole text: the definition
        text = torch.cat([text, model(text)[:, -1:].argmax(-1)], dim=1)
    expected = text[:, PROMPT:]
    assert torch.equal(generate(model, prompt, NEW, snlp.Plan(n_par=n, iters=n, start=start)), expected)
    assert torch.equal(generate(model, prompt, NEW), expected)


def check_lossless_drafting(model, prompt, plan):
    sequential = generate(model, prompt, 3 * NEW)
    drafted, stats = speculate(model, prompt, 3 * NEW, plan, draft_len=3)
    assert torch.equal(drafted, sequential)
    assert stats.accepted < stats.drafted  # the draft was rejected somewhere: the verifier did its work


@pytest.mark.parametrize("start, n", SEGMENTS)
@torch.no_grad()
def test_speculative_drafting_with_a_middle_segment_is_lossless(model, idx, start, n):
    # K = 0: the draft skips the segment's blocks (its states are h_s repeated), so that it is often wrong
    check_lossless_drafting(model, idx[:1], snlp.Plan(n_par=n, iters=0, start=start))


@pytest.mark.parametrize("start, n", [(1, 2), (3, 4)])
@torch.no_grad()
def test_speculative_drafting_with_a_fused_middle_segment_is_lossless(idx, start, n):
    """Fused chunks keep a draft cache of their own, rewritten from the verifier's exact segment states."""
    model = random_model(tiny_config(n_layer=L, vocab_size=HF_VOCAB), seed=3)
    check_lossless_drafting(model, idx[:1], snlp.Plan(n_par=n, iters=0, start=start, fuse=2))


def test_a_segment_outside_the_model_is_refused_by_name(model):
    for plan, message in [
        (snlp.Plan(n_par=3, start=6), r"Plan.start=6 with n_par=3: .* start must be an int in \[0, 5\]"),
        (snlp.Plan(n_par=2, start=-1), r"Plan.start=-1 .* in \[0, 6\]"),
        (snlp.Plan(n_par=0, start=2), r"Plan.n_par must be an int in \[1, 8\]"),
    ]:
        with pytest.raises(ValueError, match=message):
            plan.check(model)
    if not isinstance(model, hf.HFModel):
        with pytest.raises(ValueError, match=r"Plan.fuse=2 must be a positive int that divides n_par=3"):
            snlp.Plan(n_par=3, fuse=2, start=1).check(model)


def test_the_tail_is_the_default_segment():
    plan = snlp.Plan(n_par=3)
    assert plan.segment(L) == range(5, 8) == snlp.Plan(n_par=3, start=5).segment(L)
    assert snlp.Plan(n_par=3, start=1).segment(L) == range(1, 4)
