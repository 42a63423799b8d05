"""models.inference.ranks: decoding with a model split by layers across gloo processes (torchrun), as a pipeline
and with SNLP over stages, against the single-process model and StageSystem; faults; the `--stages` command.

Each multi-process case is one torchrun of tests/stage_worker.py (float64, an 8-layer model whose backout state
lies inside a stage at P = 2 and 4), shared by the tests that read it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import layersolve as ls
from helpers import random_model, tiny_config
from models.inference import ranks
from models.inference.decode import generate
from models.inference.stages import StageSystem
from models.nanochat import checkpoint
from models.nanochat.block import KVCache

L, NEW = 8, 6
WORKER = Path(__file__).with_name("stage_worker.py")
distributed = pytest.mark.distributed  # the tests that start processes: CI's second step (pyproject's markers)


def torchrun(stages: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A liveness bound, not a timing assertion: a hung process group fails the test instead of the suite."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={stages}", *args], capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).parents[1])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stages")
    checkpoint.save(random_model(tiny_config(n_layer=L), seed=3), directory, 1)
    return directory


@pytest.fixture(scope="module")
def model(ckpt):
    return checkpoint.load(ckpt, dtype=torch.float64).eval()


@pytest.fixture(scope="module", params=[2, 4])
def run(request, ckpt, tmp_path_factory):
    stages = request.param
    out = tmp_path_factory.mktemp(f"run{stages}") / "out.pt"
    proc = torchrun(stages, str(WORKER), str(ckpt), str(out), "--stages", str(stages), "--new", str(NEW))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return stages, out, torch.load(out)


@distributed
def test_k_equals_p_and_the_pipeline_give_the_sequential_greedy_tokens(run, model):
    _, _, out = run
    expected = generate(model, out["prompt"], NEW)
    assert torch.equal(out["greedy"]["full"], expected) and torch.equal(out["greedy"]["pipeline"], expected)


@distributed
def test_the_stage_decoders_run_in_inference_mode(run):
    _, _, out = run
    assert out["inference"] == [True, True]


@distributed
@pytest.mark.parametrize("name", ["full", "pipeline"])
def test_k_equals_p_and_the_pipeline_give_the_sequential_logits(run, model, name):
    _, _, out = run
    logits, _ = out["prompt_step"][name]
    torch.testing.assert_close(logits, model(out["prompt"]), rtol=1e-10, atol=1e-10)


@distributed
@pytest.mark.parametrize("name, jacobian", [("idn1", ls.Identity()), ("jacobi1", ls.Zero())])
def test_k1_equals_the_single_process_stage_solve(run, model, name, jacobian):
    """K = 1 of P: the final stage trace and the logits (backout state moved by the surrogate) of layersolve's solve
    of StageSystem, below the trivial K = P."""
    stages, _, out = run
    system = StageSystem(model, model.embed(out["prompt"]), stages)
    sol = ls.solve(system, system.h0, ls.Newton(jacobian=jacobian), iters=1)
    guess = system.h0.expand(stages + 1, *system.h0.shape)  # Repeat: x_c^0 = x_0, what the last evaluation saw
    logits, trace = out["prompt_step"][name]
    torch.testing.assert_close(trace, sol.trace, rtol=1e-10, atol=1e-10)
    expected = system.logits(sol.trace, guess, gain=1.0 if name == "idn1" else 0.0)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    assert (logits - model(out["prompt"])).abs().max() > 1e-4  # K = 1 < P is not the sequential model


@distributed
def test_k1_decoding_caches_the_keys_of_the_final_stage_input(run, model):
    """With IDN K = 1, stage 2's input is exact after the correction (stage 1 saw x_0), so the keys its first block
    caches for every token, rewritten after each step's correction, are the sequential decoder's; without the
    rewrite they would be those of the guess x_0."""
    stages, path, out = run
    sequence = torch.cat([out["prompt"], out["greedy"]["full"][:, :-1]], dim=1)
    cache = KVCache(L, sequence.shape[1])
    model.trace(model.embed(sequence), cache=cache)
    saved, fed = torch.load(f"{path}.rank1"), sequence.shape[1]  # the cache holds one more slot, never fed
    torch.testing.assert_close(saved["k"][0, ..., :fed, :], cache.k[L // stages], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(saved["v"][0, ..., :fed, :], cache.v[L // stages], rtol=1e-10, atol=1e-10)


@distributed
def test_each_rank_materializes_only_its_stage(run):
    stages, _, out = run
    blocks = {int(name.split(".")[2]) for name in out["materialized"] if name.startswith("transformer.h.")}
    assert blocks == set(range(L // stages))
    assert {"transformer.wte.weight", "lm_head.weight"} <= set(out["materialized"])


def test_a_later_stage_loads_neither_the_embedding_nor_the_head(ckpt):
    real = {name for name, p in ranks.load_stage(ckpt, 1, 2).model.named_parameters() if not p.is_meta}
    assert {int(n.split(".")[2]) for n in real if n.startswith("transformer.h.")} == set(range(L // 2, L))
    assert not any(n.startswith(("transformer.wte", "lm_head", "smear")) for n in real)
    assert {"value_embeds.5.weight", "value_embeds.7.weight"} <= real and "value_embeds.1.weight" not in real


@distributed
@pytest.mark.parametrize("fault, why", [("exit", "its process has exited"), ("hang", "nothing arrived within 3 s")])
def test_a_failed_rank_is_named_by_the_others(ckpt, tmp_path, fault, why):
    out = tmp_path / "out.pt"
    torchrun(2, str(WORKER), str(ckpt), str(out), "--stages", "2", "--timeout", "3", "--fault", fault)
    error = torch.load(out)["error"]
    assert error.startswith("rank 0: no ") and f"from rank 1 ({why})" in error


def test_plans_and_worlds_that_cannot_run_are_refused(ckpt):
    with pytest.raises(ValueError, match=r"iters=3 must be an int in \[1, 2\]"):
        ranks.StagePlan(3).check(2)
    with pytest.raises(ValueError, match="stages are corrected by a scalar surrogate, one of"):
        ranks.StagePlan(1, ls.Diagonal()).check(2)
    with pytest.raises(ValueError, match=r"stages=3 must divide the model's 8 layers"):
        ranks.load_stage(ckpt, 0, 3)
    with pytest.raises(ValueError, match=r"start it under `torchrun --nproc-per-node 2` \(WORLD_SIZE is unset\)"):
        ranks.init_process_group(2, timeout=5)


@distributed
def test_generate_with_stages_under_torchrun(tmp_path):
    """The command a user runs, tokenizer and all: SNLP decoding, then the bench (pipeline against K = 1)."""
    from models.tools import cli

    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), "--steps", "2", "--depth", "4", "--width", "64", "--seq-len", "32",
                     "--vocab-size", "512", "--eval-tokens", "512", "--eval-every", "2"]) == 0
    proc = torchrun(2, "-m", "models.tools.cli", "generate", str(run), "--stages", "2", "--iters", "1",
                    "--max-new", "4")
    assert proc.returncode == 0 and proc.stdout.startswith("ROMEO."), proc.stderr[-3000:]
    assert "2 stages, SNLP IDN K=1:" in proc.stderr
    out = tmp_path / "bench.json"
    proc = torchrun(2, "-m", "models.tools.cli", "generate", str(run), "--stages", "2", "--bench", "--repeats", "1",
                    "--max-new", "4", "--temperature", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "over the pipeline, top-1 agreement" in proc.stdout and out.exists()


# -- Hugging Face models: a safetensors directory split by layers ----------------------------------------------------

HF_COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, head_dim=8)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def hf_run(request, tmp_path_factory):
    """A tiny random model (Gemma3: sliding and full layers, a rotary table per type, a scaled embedding) saved
    in float64 as save_pretrained writes it, then the worker at P = 2 (two layers per stage)."""
    transformers = pytest.importorskip("transformers")
    config = (transformers.LlamaConfig(**HF_COMMON) if request.param == "llama" else
              transformers.Gemma3TextConfig(**HF_COMMON, sliding_window=5,
                                            layer_types=["sliding_attention"] * 3 + ["full_attention"]))
    torch.manual_seed(0)
    lm = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").to(torch.float64).eval()
    directory = tmp_path_factory.mktemp(f"hf-{request.param}")
    lm.save_pretrained(directory)
    out = directory / "out.pt"
    proc = torchrun(2, str(WORKER), str(directory), str(out), "--stages", "2", "--new", str(NEW))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the reference as transformers loads the directory: its buffers (Gemma's embedding scale, the rotary
    # frequencies) are computed in the saved dtype, float64, not rounded through float32 as the model built above
    lm = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="sdpa").eval()
    return directory, lm, out, torch.load(out)


@distributed
@torch.no_grad()
def test_hf_k_equals_p_and_the_pipeline_give_the_models_greedy_tokens_and_logits(hf_run):
    _, lm, _, out = hf_run
    idx, tokens = out["prompt"], []
    for _ in range(NEW):  # greedy by the model's own forward, no cache
        tokens.append(lm(idx).logits[:, -1].argmax(-1))
        idx = torch.cat([idx, tokens[-1][:, None]], dim=1)
    expected = torch.stack(tokens, dim=1)
    assert torch.equal(out["greedy"]["full"], expected) and torch.equal(out["greedy"]["pipeline"], expected)
    for name in ("full", "pipeline"):
        torch.testing.assert_close(out["prompt_step"][name][0], lm(out["prompt"]).logits, rtol=1e-10, atol=1e-10)


@distributed
@torch.no_grad()
def test_hf_k1_is_the_identity_correction_of_the_second_stage(hf_run):
    """x_2^1 = F_2(x_0) + (x_1 - x_0) with x_1 = F_1(x_0) exact: built here from the whole model's layers."""
    from models import hf

    _, lm, _, out = hf_run
    full = hf.HFModel(lm, parallel="loop")
    emb = full.embed(out["prompt"])
    exact = full.trace(emb)
    h = emb.x0
    for layer in (2, 3):
        h = full.layers.evaluate(layer, h[None], full.layer_inputs(emb, layer, 1), batched=False)[0][0]
    expected = torch.stack([emb.x0, exact[2], h + exact[2] - emb.x0])
    logits, trace = out["prompt_step"]["idn1"]
    torch.testing.assert_close(trace, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(logits, full.head(expected[-1]), rtol=1e-10, atol=1e-10)


@distributed
@torch.no_grad()
def test_hf_k1_decoding_caches_the_keys_of_the_final_stage_input(hf_run):
    from models import hf

    _, lm, path, out = hf_run
    full = hf.HFModel(lm, parallel="loop")
    sequence = torch.cat([out["prompt"], out["greedy"]["full"][:, :-1]], dim=1)
    cache = KVCache(4, sequence.shape[1])
    full.trace(full.embed(sequence), cache=cache)
    saved, fed = torch.load(f"{path}.rank1"), sequence.shape[1]
    torch.testing.assert_close(saved["k"][0, ..., :fed, :], cache.k[2], rtol=1e-10, atol=1e-10)


@distributed
def test_hf_each_rank_reads_only_its_layers(hf_run):
    directory, _, _, out = hf_run
    layers = {int(n.split(".")[3]) for n in out["materialized"] if n.startswith("lm.model.layers.")}
    assert layers == {0, 1} and "lm.model.embed_tokens.weight" in out["materialized"]
    later = ranks.load_stage(directory, 1, 2)
    assert len(later.model.lm.model.layers) == 2 and later.model.lm.model.embed_tokens.weight.shape[0] == 1
    with pytest.raises(ValueError, match=r"stages=3 must divide the model's 4 layers"):
        ranks.load_stage(directory, 0, 3)


@distributed
def test_generate_with_stages_reads_a_hugging_face_directory(tmp_path):
    """`snlp generate DIR --stages 2` on a save_pretrained directory with its tokenizer."""
    transformers = pytest.importorskip("transformers")
    from helpers import tiny_tokenizer
    from models.training.data import load_corpus

    tokenizer = tiny_tokenizer(list(load_corpus(None).split()[0].texts[:2]))
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**HF_COMMON, "vocab_size": len(tokenizer)}))
    lm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    proc = torchrun(2, "-m", "models.tools.cli", "generate", str(tmp_path), "--stages", "2", "--pipeline",
                    "--max-new", "4")
    assert proc.returncode == 0 and proc.stdout.startswith("ROMEO."), proc.stderr[-3000:]
    assert "2 stages, pipeline:" in proc.stderr
