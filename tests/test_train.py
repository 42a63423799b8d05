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


def test_snlp_forward_fine_tuning(data, tmp_path):
    base = train(BASE, data, tmp_path / "base", show_progress=False)
    plan = snlp.Plan(n_par=2, iters=1)
    cfg = dataclasses.replace(BASE, sft_plan=plan, init_from=str(tmp_path / "base"))
    tuned = train(cfg, data, tmp_path / "sft", show_progress=False)
    assert tuned["train"][0]["ce"] < base["train"][0]["ce"]  # it starts from the trained weights
    with pytest.raises(ValueError, match="holds a model of another config"):
        other = dataclasses.replace(cfg, model=dataclasses.replace(MODEL, n_layer=2))
        train(other, data, tmp_path / "x", show_progress=False)
