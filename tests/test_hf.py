"""models.hf: every supported transformers family (tiny random models, float64) solved by the same plans and
decoded by the same Decoder as nanochat's; bad input named; `snlp eval --hf` end to end."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")  # the [hf] extra; the dev extra installs it, so CI runs these

import layersolve as ls
from models import hf, snlp
from models.inference.decode import Decoder, generate
from models.tools import cli
from helpers import HF_FAMILIES, HF_VOCAB, tiny_hf_config, tiny_hf_lm, tiny_tokenizer

VOCAB, PROMPT, NEW = HF_VOCAB, 12, 8  # HF_WINDOW < PROMPT + NEW: the sliding windows bind in every test
FAMILIES = HF_FAMILIES


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    lm = tiny_hf_lm(request.param)
    return request.param, lm, hf.HFModel(lm)


@pytest.fixture(scope="module")
def idx():
    return torch.randint(0, VOCAB, (2, PROMPT), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_the_sequential_trace_reproduces_the_models_logits(family, idx):
    _, lm, model = family
    reference = lm(idx).logits
    assert torch.equal(model(idx), reference)  # the model's own forward is the baseline
    assert (model.head(model.trace(model.embed(idx))[-1]) - reference).abs().max() < 1e-12


@pytest.mark.parametrize("jacobian", [ls.Identity(), ls.Zero(), ls.Diagonal(), ls.Exact()], ids=repr)
@torch.no_grad()
def test_every_strategy_is_exact_at_k_equal_n(family, idx, jacobian):
    _, lm, model = family
    out = snlp.forward(model, idx, snlp.Plan(n_par=4, jacobian=jacobian, iters=4))
    assert (out.logits - lm(idx).logits).abs().max() < 1e-10


@torch.no_grad()
def test_below_k_equal_n_the_exact_prefix_grows_one_layer_per_iteration(family, idx):
    """Finite termination on the adapter: after K = 2 of n = 4 iterations, tail layers 1-2 are exact, 3-4 are not."""
    _, _, model = family
    plan = snlp.Plan(n_par=4, iters=2)
    _, exact = snlp.sequential_trace(model, idx, plan)
    error = snlp.forward(model, idx, plan, reference=exact).stats.error[-1]
    assert error[:2].max() < 1e-12 and error[2:].min() > 1e-6


@torch.no_grad()
def test_vmap_and_the_loop_evaluate_the_same_layers(family, idx):
    _, lm, model = family
    looped = hf.HFModel(lm, parallel="loop")
    assert model.layers.parallel == "vmap"  # every supported family runs under vmap
    emb = model.embed(idx)
    inputs = torch.randn(3, *emb.x0.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a = model.layers.evaluate(1, inputs, model.layer_inputs(emb, 1, 3))
    b = looped.layers.evaluate(1, inputs, looped.layer_inputs(emb, 1, 3))
    assert all((x - y).abs().max() < 1e-12 for x, y in zip(a, b))


def greedy_by_forward(lm, prompt, new):
    """Greedy decoding by the model's own forward over the whole text at every step (no cache): the definition."""
    text = prompt
    for _ in range(new):
        text = torch.cat([text, lm(text).logits[:, -1:].argmax(-1)], dim=1)
    return text[:, prompt.shape[1]:]


@torch.no_grad()
def test_kv_cache_decoding_reproduces_greedy_generate(family, idx):
    name, lm, model = family
    prompt = idx[:1]
    expected = greedy_by_forward(lm, prompt, NEW)
    if name != "mistral":  # transformers' cached generate is its forward's greedy decoding
        generated = lm.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[:, PROMPT:]
        assert torch.equal(generated, expected)
    # A windowed Mistral's cached generate departed from its own forward once the window binds (transformers 5.24,
    # here at the third new token), so the forward alone defines greedy decoding there: ours follows the forward,
    # whichever transformers release is installed.
    assert torch.equal(generate(model, prompt, NEW), expected)
    assert torch.equal(generate(model, prompt, NEW, snlp.Plan(n_par=3, iters=3)), expected)  # K = n_par: exact


@torch.no_grad()
def test_decoding_below_k_equal_n_caches_the_final_iterates_keys(family, idx):
    """At K = 1 < n the solve's last evaluation saw stale inputs at tail layers 2..n: the decoder's cache must hold
    the keys and values of the final iterate instead (store_kv), so that later tokens see the trace that gave the
    output."""
    _, _, model = family
    plan, L = snlp.Plan(n_par=3, iters=1), model.config.n_layer
    decoder = Decoder(model, plan, capacity=PROMPT)
    decoder.step(idx)
    emb = model.embed(idx)
    trace = snlp.prepare(model, emb, plan).solve().trace
    k, v = model.layers.keys_values(L - 3, trace[:-1], model.layer_inputs(emb, L - 3, 3))
    assert (decoder.segment.k - k).abs().max() < 1e-12 and (decoder.segment.v - v).abs().max() < 1e-12


def test_an_unsupported_architecture_is_named(tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(hf.UnsupportedModel, match=r"model_type 'gpt2' \(GPT2LMHeadModel\) is not supported; "
                                                  r"supported: Llama \(llama\), Mistral"):
        hf.HFModel(gpt2)
    gpt2.save_pretrained(tmp_path)
    with pytest.raises(hf.UnsupportedModel, match="model_type 'gpt2' is not supported"):
        hf.load(tmp_path)


def test_a_directory_without_weights_is_named(tmp_path):
    tiny_hf_config("llama").save_pretrained(tmp_path)
    with pytest.raises(hf.HFLoadError, match=r"no model weights \(\*.safetensors, pytorch_model\*.bin, \*.gguf\)"):
        hf.load(tmp_path)
    with pytest.raises(hf.HFLoadError, match="not a directory"):
        hf.load(tmp_path / "missing")


def test_n_par_beyond_the_layers_is_refused(family, idx):
    _, _, model = family
    with pytest.raises(ValueError, match=r"Plan.n_par must be an int in \[1, 4\]"):
        snlp.forward(model, idx, snlp.Plan(n_par=5))
    with pytest.raises(ValueError, match="fusing layers is defined for nanochat models only"):
        snlp.forward(model, idx, snlp.Plan(n_par=4, fuse=2))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny Llama and its tokenizer, saved as a user's local model directory."""
    from models.training.data import load_corpus

    train, _ = load_corpus(None).split()
    tokenizer = tiny_tokenizer(list(train.texts[:4]))
    config = tiny_hf_config("llama")
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    lm.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory, lm


def test_a_saved_model_loads_with_its_tokenizer(saved):
    directory, lm = saved
    model, tokenizer = hf.load(directory)
    idx = torch.tensor([tokenizer.encode("ROMEO. But soft", prepend=tokenizer.get_bos_token_id())])
    with torch.no_grad():
        assert torch.equal(model(idx), lm(idx).logits)
    sizes = tokenizer.token_bytes()
    assert sizes[tokenizer.get_bos_token_id()] == 0
    text = "ROMEO. But soft, what light"
    assert int(sizes[tokenizer.encode(text)].sum()) == len(text.encode())  # bits per byte counts the text's bytes


def test_snlp_eval_hf_reports_the_grid(saved, tmp_path, capsys, monkeypatch):
    directory, _ = saved
    monkeypatch.setattr(cli, "CACHE", tmp_path / "cache")
    out = tmp_path / "eval.json"
    assert cli.main(["eval", "--hf", str(directory), "--eager-baseline", "--context", "32", "--max-tokens", "256", "--batch-size", "2",
                     "--iters", "1", "2", "--strategies", "idn", "jacobi", "--repeats", "1", "--ar-prompts", "0",
                     "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["checkpoint"] == str(directory) and results["context"] == 32
    grid = results["grid"]
    assert set(grid) == {"sequential", "IDN n2 K1 repeat", "IDN n2 K2 repeat", "Jacobi n2 K1 repeat",
                         "Jacobi n2 K2 repeat"}
    assert grid["IDN n2 K2 repeat"]["top1_agreement"] == 1.0 and grid["IDN n2 K1 repeat"]["top1_agreement"] < 1.0
    assert "IDN n2 K1 repeat" in results["speed"]["rows"]
    assert "speedup: the median time of the eager sequential forward" in capsys.readouterr().out


def test_snlp_eval_refuses_both_or_neither_model(saved, capsys):
    directory, _ = saved
    assert cli.main(["eval"]) == 2
    assert "give a run directory or --hf DIR" in capsys.readouterr().err
    assert cli.main(["eval", str(directory), "--hf", str(directory)]) == 2
    assert "give a run directory or --hf DIR, not both" in capsys.readouterr().err


def test_snlp_bench_hf_times_the_plans(saved, tmp_path, capsys):
    directory, _ = saved
    assert cli.main(["bench", "--hf", str(directory), "--tokens", "24", "--repeats", "1",
                     "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    rows = results["speed"]["rows"]
    assert {"sequential", "sequential compiled", "IDN n2 K1 repeat", "Jacobi n2 K1 repeat"} <= set(rows)
    assert results["speed"]["baseline"].startswith(f"fastest sequential forward: {results['speed']['baseline_case']} "
                                                   "(batch 1 x 24 tokens")
    assert "IDN n2 K1 repeat" in capsys.readouterr().out


def test_snlp_bench_hf_takes_middle_segments(saved, tmp_path):
    directory, _ = saved
    assert cli.main(["bench", "--hf", str(directory), "--eager-baseline", "--tokens", "24", "--repeats", "1", "--start", "1",
                     "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["speed"]["rows"]
    assert {"IDN n2@1 K1 repeat", "Jacobi n2@1 K4 repeat"} <= set(rows)


def test_snlp_plan_hf_probes_segments_of_the_directorys_model(saved, tmp_path, capsys, monkeypatch):
    directory, _ = saved
    monkeypatch.setattr(cli, "CACHE", tmp_path / "cache")
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--hf", str(directory), "--eager-baseline", "--context", "24", "--max-tokens", "96", "--batch-size", "2",
                     "--lengths", "2", "--strategies", "idn", "jacobi", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["model"] == str(directory) and len(results["profile"]) == 4
    # length 2 of 4 layers: the tail 2-3 and the two quietest other windows, each by IDN and Jacobi at K = 1, 2
    assert {(r["start"], r["stop"]) for r in results["rows"]} == {(0, 2), (1, 3), (2, 4)}
    assert len(results["rows"]) == 12 and "recommended: layers" in capsys.readouterr().out
