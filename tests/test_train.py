"""Training: the loop, resume, DDP parity under gloo, the SNLP regularizer, SNLP-forward SFT, bad input."""

import dataclasses
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

import layersolve as ls
from helpers import random_model, tiny_config, tokens
from models import nanochat
from models.inference import snlp
from models.nanochat.gpt import GPTConfig
from models.training.regularizer import Regularizer, snlp_loss
from models.training.data import TokenLoader
from models.nanochat.gpt import GPT
from models.training.config import TrainConfig
from models.training.loop import Data, Distributed, StepLoss, train

MODEL = GPTConfig(sequence_len=32, vocab_size=512, n_layer=4, n_head=1, n_kv_head=1, n_embd=64)
BASE = TrainConfig(model=MODEL, steps=6, batch_size=4, warmup_steps=2, eval_every=0, eval_tokens=1024)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return Data.prepare(None, 512, tmp_path_factory.mktemp("cache"))


def test_training_lowers_the_loss_and_writes_a_checkpoint(data, tmp_path):
    cfg = dataclasses.replace(BASE, steps=12, eval_every=6)
    metrics = train(cfg, data, tmp_path, show_progress=False)
    assert metrics["train"][-1]["ce"] < metrics["train"][0]["ce"] - 0.5
    assert [e["step"] for e in metrics["evals"]] == [6, 12] and metrics["evals"][-1]["loss"] < 6.2
    assert nanochat.steps(tmp_path) == [12] and (tmp_path / "optim_000012_rank0.pt").exists()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["steps"] == 12 and len(saved["train"]) == 12


class Interrupt(Exception):
    pass


def test_resume_continues_bit_for_bit(data, tmp_path, monkeypatch):
    cfg = dataclasses.replace(BASE, save_every=3, regularizer=Regularizer(n_par_configs=(2,)), reg_lambda=0.5)
    straight = train(cfg, data, tmp_path / "a", show_progress=False)

    from models.training import loop as train_module
    original = train_module.TokenLoader.__next__
    calls = {"n": 0}

    def interrupted(self):  # the run dies while fetching the batch of step 4 (after the step-3 checkpoint)
        calls["n"] += 1
        if calls["n"] == 5:
            raise Interrupt
        return original(self)

    monkeypatch.setattr(train_module.TokenLoader, "__next__", interrupted)
    with pytest.raises(Interrupt):
        train(cfg, data, tmp_path / "b", show_progress=False)
    monkeypatch.setattr(train_module.TokenLoader, "__next__", original)
    assert nanochat.steps(tmp_path / "b") == [3]
    resumed = train(cfg, data, tmp_path / "b", resume=True, show_progress=False)
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in straight["train"]]
    a, b = nanochat.load(tmp_path / "a"), nanochat.load(tmp_path / "b")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_resume_refuses_another_config_and_keeps_the_checkpoint(data, tmp_path):
    train(BASE, data, tmp_path, show_progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    other = dataclasses.replace(BASE, batch_size=8)
    with pytest.raises(ValueError, match=r"trained with another config \(differing: \['batch_size'\]\)"):
        train(other, data, tmp_path, resume=True, show_progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(BASE, data, tmp_path / "empty", resume=True, show_progress=False)


def test_vocabulary_mismatch(data, tmp_path):
    wrong = dataclasses.replace(BASE, model=dataclasses.replace(MODEL, vocab_size=1024))
    with pytest.raises(ValueError, match="the tokenizer has 512 tokens but the model config vocab_size=1024"):
        train(wrong, data, tmp_path, show_progress=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_env(rank, world, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


def _ddp_train(rank, world, port, cfg, data, out):
    _ddp_env(rank, world, port)
    train(cfg, data, out, show_progress=False)
    torch.distributed.destroy_process_group()


def _ddp_gradients(rank, world, port, cfg, batch, out):
    """One DDP backward on this rank's rows of the batch; rank 0 saves the averaged gradients."""
    _ddp_env(rank, world, port)
    Distributed.from_env()
    model = GPT(cfg.model)
    model.init_weights(seed=cfg.seed)
    loss_module = torch.nn.parallel.DistributedDataParallel(StepLoss(model, cfg))
    x, y = batch
    rows = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
    loss_module(x[rows], y[rows], 0)[0].backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
    torch.distributed.destroy_process_group()


def test_ddp_under_gloo_matches_one_process(data, tmp_path):
    """Two processes with half the batch each, gradients averaged by DDP: the same gradients as one process on
    the whole batch, and the same weights after a step (the loader gives rank r rows [rB, (r+1)B) of each global
    batch). One step: Adam's normalized updates amplify rounding on near-zero gradients over later steps."""
    cfg = dataclasses.replace(BASE, steps=1, regularizer=Regularizer(n_par_configs=(2,)), reg_lambda=1.0)
    x, y = next(TokenLoader(data.train, 4, MODEL.sequence_len))
    model = GPT(cfg.model)
    model.init_weights(seed=cfg.seed)
    StepLoss(model, cfg)(x, y, 0)[0].backward()
    mp.spawn(_ddp_gradients, args=(2, _free_port(), cfg, (x, y), tmp_path / "grads.pt"), nprocs=2, join=True)
    averaged = torch.load(tmp_path / "grads.pt")
    assert len(averaged) > 20
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(averaged[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)

    train(cfg, data, tmp_path / "single", show_progress=False)
    mp.spawn(_ddp_train, args=(2, _free_port(), cfg, data, tmp_path / "ddp"), nprocs=2, join=True)
    one, two = nanochat.load(tmp_path / "single"), nanochat.load(tmp_path / "ddp")
    # Adam's first update is about lr * sign(g): where g is rounding noise (backout_lambda's gradient is ~1e-10 at
    # nanochat's init, whose zero output projections make it vanish), the sign is noise too. Compare the rest.
    noise = {n for n, p in model.named_parameters() if p.grad is not None and 0 < p.grad.abs().max() < 1e-8}
    assert noise <= {"backout_lambda"} and len(one.state_dict()) - len(noise) > 20
    for key, value in one.state_dict().items():
        if key not in noise:
            torch.testing.assert_close(two.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert (tmp_path / "ddp" / "optim_000001_rank1.pt").exists()


# -- the regularizer -------------------------------------------------------------------------------------------

def sequential_trace(model, idx):
    emb = model.embed(idx)
    return emb, model.trace(emb)


def direct_idn_loss(model, emb, trace, n, selected):
    """IDN K = 1 from h_init = h_{L-n}: h~_j = h_init + sum_{i<=j} (f_i(h_init) - h_init), compared by relative L2."""
    L = model.config.n_layer
    h_init = trace[L - n]
    branches = [model.block(L - n + i, h_init, emb) - h_init for i in range(n)]
    loss = 0.0
    for j in selected:
        approx, target = h_init + sum(branches[:j + 1]), trace[L - n + j + 1]
        loss = loss + ((approx - target).norm(dim=-1) / target.norm(dim=-1).clamp_min(1e-6)).mean()
    return loss


@pytest.mark.parametrize("overrides", [dict(), dict(use_mhc=True, mhc_num_streams=2)])
def test_regularizer_value_from_the_sequential_trace(overrides):
    model = random_model(tiny_config(**overrides), seed=1)
    emb, trace = sequential_trace(model, tokens(2, 24, seed=1))
    reg = Regularizer(n_par_configs=(2, 5), stride=2)
    assert reg.selected(5) == [1, 3, 4] and reg.selected(2) == [1]
    expected = direct_idn_loss(model, emb, trace, 2, [1]) + direct_idn_loss(model, emb, trace, 5, [1, 3, 4])
    for mode in ("all", "batched"):
        torch.testing.assert_close(snlp_loss(model, emb, trace, dataclasses.replace(reg, mode=mode)).double(),
                                   expected.double(), rtol=1e-5, atol=1e-6)
    last_only = dataclasses.replace(reg, stride=0)
    torch.testing.assert_close(snlp_loss(model, emb, trace, last_only).double(),
                               (direct_idn_loss(model, emb, trace, 2, [1]) + direct_idn_loss(model, emb, trace, 5, [4])
                                ).double(), rtol=1e-5, atol=1e-6)


def test_regularizer_sample_mode_draws_one_config_per_step():
    model = random_model(tiny_config(), seed=2)
    emb, trace = sequential_trace(model, tokens(1, 16, seed=2))
    reg = Regularizer(n_par_configs=(2, 4), mode="sample")
    drawn = [reg.configs(step) for step in range(20)]
    assert all(len(d) == 1 for d in drawn) and {d[0] for d in drawn} == {2, 4}
    single = Regularizer(n_par_configs=drawn[7])
    torch.testing.assert_close(snlp_loss(model, emb, trace, reg, step=7), snlp_loss(model, emb, trace, single))


@pytest.mark.parametrize("jacobian", [ls.Identity(), ls.Scaled(), ls.Diagonal(probes=1), ls.Mixing()])
def test_regularizer_variants_are_their_one_iteration_solves(jacobian):
    """Every variant's approximation is layersolve's own K = 1 solve from repeat."""
    model = random_model(tiny_config(use_mhc=True, mhc_num_streams=2), seed=3)
    emb, trace = sequential_trace(model, tokens(1, 16, seed=3))
    system = model.layer_system(emb, 3)
    sol = ls.solve(system, trace[3], ls.Newton(jacobian=jacobian), iters=1)
    expected = sum(((sol.trace[j + 1] - trace[4 + j]).norm(dim=-1) / trace[4 + j].norm(dim=-1)).mean()
                   for j in range(3))
    torch.testing.assert_close(snlp_loss(model, emb, trace, Regularizer(jacobian, (3,))), expected)


@pytest.mark.parametrize("detach", [False, True])
def test_regularizer_gradient_with_and_without_a_detached_target(detach):
    model = random_model(tiny_config(), seed=4, dtype=torch.float32).requires_grad_(True)
    emb, trace = sequential_trace(model, tokens(1, 16, seed=4))
    trace = [t.detach().requires_grad_() for t in trace]
    loss = snlp_loss(model, emb, trace, Regularizer(n_par_configs=(3,), detach_target=detach))
    loss.backward()
    assert trace[3].grad is not None and trace[3].grad.abs().sum() > 0  # the start h_{L-n} is always live
    target_grad = trace[6].grad
    assert (target_grad is None) == detach
    assert model.transformer.h[5].mlp.c_fc.weight.grad.abs().sum() > 0  # the approximation trains the blocks


def test_snlp_forward_fine_tuning(data, tmp_path):
    base = train(BASE, data, tmp_path / "base", show_progress=False)
    plan = snlp.Plan(n_par=2, iters=1)
    cfg = dataclasses.replace(BASE, sft_plan=plan, init_from=str(tmp_path / "base"))
    tuned = train(cfg, data, tmp_path / "sft", show_progress=False)
    assert tuned["train"][0]["ce"] < base["train"][0]["ce"]  # it starts from the trained weights
    with pytest.raises(ValueError, match="holds a model of another config"):
        other = dataclasses.replace(cfg, model=dataclasses.replace(MODEL, n_layer=2))
        train(other, data, tmp_path / "x", show_progress=False)
