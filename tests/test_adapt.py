"""Adaptation (models.training.adapt, `snlp adapt`): on tiny random Llama / Qwen3 / Gemma3 models and a nanochat
model in float64, a segment below the tail (K < n), the objective is the plan inference runs, training lowers the
plan's KL to the original and touches nothing outside the segment, LoRA merges exactly, the output loads through
transformers, resume is bit-for-bit, and bad input is refused by name."""

import dataclasses
import json

import pytest
import torch

from helpers import HF_VOCAB, random_model, tiny_config, tiny_hf_lm
from models.inference import snlp
from models.training import adapt as A, evaluate
from models.training.data import TokenStream

KINDS = ["llama", "qwen3", "gemma3", "nanochat"]
PLAN = snlp.Plan(n_par=2, iters=1, start=1)  # blocks 1, 2 of 4: a prefix, a segment below the tail, a suffix


def model_of(kind: str):
    """A tiny float64 model whose parallel solve is far from exact. transformers' initialization (std 0.02, norms
    at 1) makes near-identity blocks, whose K = 1 solve is already close: the matrices are scaled up and the norm
    weights drawn at random, as a trained model's are."""
    if kind == "nanochat":
        return random_model(tiny_config(n_layer=4), seed=0)
    from models.hf import HFModel

    lm = tiny_hf_lm(kind, layers=4, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "embed" not in name:
                p.mul_(5.0) if p.ndim > 1 else p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    return HFModel(lm).requires_grad_(False)


def stream(vocab: int, seed: int = 0, tokens: int = 2048) -> TokenStream:
    g = torch.Generator().manual_seed(seed)
    return TokenStream(torch.randint(0, vocab, (tokens,), generator=g, dtype=torch.int32), tokens)


def batch(model, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (2, 16), generator=g)


CFG = A.AdaptConfig(PLAN, steps=12, batch_size=2, seq_len=16, lr=1e-3, save_every=6)


def plan_kl(model, original, x) -> float:
    with torch.no_grad():
        return float(evaluate.kl(original(x), snlp.forward(model, x, PLAN).logits))


@pytest.mark.parametrize("kind", KINDS)
def test_adaptation_lowers_the_plans_kl_and_leaves_the_rest_bit_identical(kind, tmp_path):
    original = model_of(kind)
    before = {name: p.clone() for name, p in original.state_dict().items()}
    x = batch(original)
    adapted, metrics = A.adapt(original, stream(original.config.vocab_size), CFG, tmp_path, show_progress=False)
    assert plan_kl(adapted, original, x) < 0.9 * plan_kl(original, original, x)
    assert all(torch.equal(p, before[name]) for name, p in original.state_dict().items())  # the teacher is frozen
    segment = [f".{i}." for i in PLAN.segment(4)]
    changed = {name for name, p in adapted.state_dict().items() if not torch.equal(p, before[name])}
    assert changed and all(any(s in name for s in segment) for name in changed), sorted(changed)
    assert len(metrics["train"]) == CFG.steps and not metrics["skipped_steps"]


@pytest.mark.parametrize("kind", ["llama", "nanochat"])
def test_the_objective_is_the_plan_that_inference_runs(kind):
    """Each KL of the objective equals the one computed from the public forwards: the loss trains the segment
    and the plan that `snlp.forward` solves, not a shifted one."""
    model = model_of(kind)
    student = A.student_of(model, CFG)
    with torch.no_grad():  # a student that differs from its teacher
        for p in student.params:
            p.add_(0.05 * torch.randn_like(p))
    x = batch(model)
    out = A.losses(student.model, model, x, CFG)
    with torch.no_grad():
        target = model(x)
        assert out.kl_sequential == pytest.approx(float(evaluate.kl(target, student.model(x))), rel=1e-9)
        assert out.kl_parallel == pytest.approx(float(evaluate.kl(target, snlp.forward(student.model, x, PLAN).logits)),
                                                rel=1e-9)
    assert out.kl_parallel > 0 and out.gap > 0 and out.solved


def test_lora_trains_only_adapters_and_merges_to_the_same_logits():
    pytest.importorskip("peft")
    model = model_of("llama")
    cfg = A.AdaptConfig(PLAN, lora_rank=2)
    student = A.student_of(model, cfg)
    assert student.params and all("lora_" in name for name, p in student.model.named_parameters() if p.requires_grad)
    with torch.no_grad():  # peft starts B at 0, where merging is trivially exact
        for p in student.params:
            p.normal_(0.0, 0.1)
    x = batch(model)
    with torch.no_grad():
        unmerged = student.model(x)
        merged = student.merged()
        assert not any("lora" in name for name in merged.state_dict())
        torch.testing.assert_close(merged(x), unmerged, rtol=1e-10, atol=1e-10)
        assert not torch.allclose(unmerged, model(x))


def test_an_interrupted_adaptation_resumes_bit_for_bit(tmp_path, monkeypatch):
    """SIGINT during step 5 finishes the step, checkpoints it and stops; --resume then ends where an uninterrupted
    run ends, to the bit."""
    import os
    import signal

    from models.training.loop import Interrupted

    original = model_of("llama")
    whole, _ = A.adapt(original, stream(HF_VOCAB), CFG, tmp_path / "whole", show_progress=False)
    losses = A.losses

    def interrupting(student, teacher, x, cfg, step=0):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return losses(student, teacher, x, cfg, step)

    monkeypatch.setattr(A, "losses", interrupting)
    with pytest.raises(Interrupted):
        A.adapt(original, stream(HF_VOCAB), CFG, tmp_path / "split", show_progress=False)
    monkeypatch.setattr(A, "losses", losses)
    resumed, metrics = A.adapt(original, stream(HF_VOCAB), CFG, tmp_path / "split", resume=True, show_progress=False)
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))
    assert [r["step"] for r in metrics["train"]] == list(range(12))
    with pytest.raises(ValueError, match="already at step 12"):
        A.adapt(original, stream(HF_VOCAB), CFG, tmp_path / "split", resume=True, show_progress=False)


@pytest.mark.parametrize("change, message", [
    (dict(plan=snlp.Plan(n_par=2, start=3)), "start must be an int in"),
    (dict(plan=snlp.Plan(n_par=2, iters=None, tol=1e-4)), "fixed number of iterations"),
    (dict(kl_parallel=0.0, kl_sequential=0.0, gap=0.0), "one is > 0"),
    (dict(seq_len=10**6), "exceeds the model's context"),
])
def test_a_config_the_model_cannot_take_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(CFG, **change).check(model_of("llama"))


def test_lora_on_a_nanochat_model_is_refused():
    with pytest.raises(ValueError, match="adapt a nanochat run fully"):
        A.AdaptConfig(PLAN, lora_rank=2).check(model_of("nanochat"))


# -- the command ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_directory(tmp_path_factory):
    """A tiny Llama with a tokenizer, saved as a user's model directory."""
    import transformers

    from helpers import tiny_hf_config, tiny_tokenizer
    from models.training.data import load_corpus

    train, _ = load_corpus(None).split()
    tokenizer = tiny_tokenizer(list(train.texts[:4]))
    config = tiny_hf_config("llama")
    config.vocab_size, config.max_position_embeddings = len(tokenizer), 128
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


ARGS = ["--n-par", "2", "--start", "1", "--steps", "4", "--batch-size", "2", "--context", "32", "--eval-tokens", "128",
        "--save-every", "2"]


def test_snlp_adapt_writes_a_model_transformers_loads(hf_directory, tmp_path, capsys, monkeypatch):
    import transformers

    from models import hf
    from models.tools import cli

    monkeypatch.setattr(cli, "CACHE", tmp_path / "cache")
    out = tmp_path / "adapted"
    assert cli.main(["adapt", "--hf", str(hf_directory), "--out", str(out), *ARGS]) == 0
    printed = capsys.readouterr().out
    assert "held-out text" in printed and "samples of the original" in printed
    record = json.loads((out / "adapt.json").read_text())
    assert record["segment"] == [1, 3] and record["iters"] == 1 and set(record["before"]) == set(record["after"])
    lm = transformers.AutoModelForCausalLM.from_pretrained(out).eval()  # an ordinary model
    adapted, _ = hf.load(out)
    original, _ = hf.load(hf_directory)
    x = torch.randint(0, lm.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(lm(x).logits, adapted(x))
        assert not torch.equal(adapted(x), original(x))
    assert cli.main(["eval", "--hf", str(out), "--eager-baseline", "--context", "32", "--max-tokens", "64", "--batch-size", "2",
                     "--iters", "1", "--strategies", "idn", "--repeats", "1", "--ar-prompts", "0",
                     "--out", str(tmp_path / "eval.json")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--out", "OUT.gguf"], "not GGUF"),
    (["--start", "3"], "--n-par 2 --start 3: "),
    (["--corpus", "EMPTY"], "has no text"),
])
def test_bad_input_is_refused_by_name(hf_directory, tmp_path, argv, message, capsys, monkeypatch):
    from models.tools import cli

    monkeypatch.setattr(cli, "CACHE", tmp_path / "cache")
    (tmp_path / "empty.txt").write_text("")
    argv = [str(tmp_path / "empty.txt") if a == "EMPTY" else str(tmp_path / a) if a == "OUT.gguf" else a
            for a in argv]
    line = ["adapt", "--hf", str(hf_directory), *ARGS, *(["--out", str(tmp_path / "out")] if "--out" not in argv
                                                        else []), *argv]
    assert cli.main(line) == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after transformers' loading bar, when the model was loaded
    assert last.startswith("snlp adapt: ") and message in last, last
