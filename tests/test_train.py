"""Training: the loop, its checkpoints, signals and resume, DDP parity under gloo, SNLP-forward SFT, bad input."""

import dataclasses
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import layersolve as ls
from models import nanochat
from models.inference import snlp
from models.nanochat.gpt import GPT, GPTConfig
from models.training.config import TrainConfig
from models.training.data import TokenLoader
from models.training.distributed import Distributed
from models.training.loop import Data, Interrupted, train
from models.training.regularizer import Regularizer
from models.training.optim import lr_multiplier, optimizers
from models.training.step import StepLoss, train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]

MODEL = GPTConfig(sequence_len=32, vocab_size=512, n_layer=4, n_head=1, n_kv_head=1, n_embd=64)
BASE = TrainConfig(model=MODEL, steps=6, batch_size=4, warmup_steps=2, eval_every=0, eval_tokens=1024)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(cache):
    return Data.prepare(None, 512, cache)


def test_training_lowers_the_loss_and_writes_a_checkpoint(data, tmp_path):
    cfg = dataclasses.replace(BASE, steps=12, eval_every=6)
    metrics = train(cfg, data, tmp_path, show_progress=False)
    assert metrics["train"][-1]["ce"] < metrics["train"][0]["ce"] - 0.5
    assert [e["step"] for e in metrics["evals"]] == [6, 12] and metrics["evals"][-1]["loss"] < 6.2
    assert nanochat.steps(tmp_path) == [12] and (tmp_path / "optim_000012_rank0.pt").exists()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config"]["steps"] == 12 and len(saved["train"]) == 12
    assert saved["skipped_steps"] == 0 and not any(r["skipped"] for r in saved["train"])
    assert (tmp_path / "tokenizer" / "tokenizer.pkl").exists()


def signalling_loader(monkeypatch, at_call: int, times: int):
    """TokenLoader.__next__ sends this process SIGINT `times` times when fetching its `at_call`-th batch."""
    original, calls = TokenLoader.__next__, []

    def fetch(self):
        calls.append(None)
        if len(calls) == at_call:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
        return original(self)

    monkeypatch.setattr(TokenLoader, "__next__", fetch)


def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_continues_bit_for_bit(data, tmp_path,
                                                                                           monkeypatch):
    cfg = dataclasses.replace(BASE, save_every=3, regularizer=Regularizer(n_par_configs=(2,)), reg_lambda=0.5)
    straight = train(cfg, data, tmp_path / "a", show_progress=False)
    handler = signal.getsignal(signal.SIGINT)
    with monkeypatch.context() as patch:
        signalling_loader(patch, at_call=5, times=1)  # while fetching the batch of step index 4
        with pytest.raises(Interrupted) as info:
            train(cfg, data, tmp_path / "b", show_progress=False)
    assert info.value.step == 5 and signal.getsignal(signal.SIGINT) is handler
    assert nanochat.steps(tmp_path / "b") == [3, 5] and (tmp_path / "b" / "tokenizer" / "tokenizer.pkl").exists()
    assert len(json.loads((tmp_path / "b" / "metrics.json").read_text())["train"]) == 5
    resumed = train(cfg, data, tmp_path / "b", resume=True, show_progress=False)
    assert signal.getsignal(signal.SIGINT) is handler
    assert [r["loss"] for r in resumed["train"]] == [r["loss"] for r in straight["train"]]
    a, b = nanochat.load(tmp_path / "a"), nanochat.load(tmp_path / "b")
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_a_second_signal_stops_at_once(data, tmp_path, monkeypatch):
    handler = signal.getsignal(signal.SIGINT)
    signalling_loader(monkeypatch, at_call=2, times=2)
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(BASE, save_every=1), data, tmp_path, show_progress=False)
    assert nanochat.steps(tmp_path) == [1] and signal.getsignal(signal.SIGINT) is handler


def test_the_step_follows_the_schedule_clips_and_zeroes_the_gradients(data):
    """The learning rates of the step's schedule; a gradient clipped to norm 1e-12 moves the weights by under 1% of
    the unclipped step (Adam's eps 1e-10 and Muon's 1e-7 outweigh it); no gradient is left behind."""
    x, y = next(TokenLoader(data.train, BASE.batch_size, MODEL.sequence_len))
    moved = {}
    for clip in (1.0, 1e-12):
        cfg = dataclasses.replace(BASE, grad_clip=clip)
        model = GPT(MODEL)
        model.init_weights(seed=0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opts = optimizers(model, cfg)
        record = train_step(StepLoss(model, cfg), opts, cfg, x, y, step=4)
        assert record.step == 4 and not record.skipped and record.ce > 0
        assert all(g["lr"] == g["initial_lr"] * lr_multiplier(cfg, 4) for o in opts for g in o.param_groups)
        assert all(p.grad is None for p in model.parameters())
        moved[clip] = max(float((p.detach() - before[n]).abs().max()) for n, p in model.named_parameters())
    assert moved[1.0] > 0.1 and moved[1e-12] < 0.01 * moved[1.0]


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
    loss_module(x[rows], y[rows], 0).total.backward()
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
    StepLoss(model, cfg)(x, y, 0).total.backward()
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
    """The fine-tuning trains on snlp.forward's logits: its first loss is theirs on the first batch, not the
    sequential forward's."""
    base = train(BASE, data, tmp_path / "base", show_progress=False)
    plan = snlp.Plan(n_par=2, iters=1)
    cfg = dataclasses.replace(BASE, sft_plan=plan, init_from=str(tmp_path / "base"))
    tuned = train(cfg, data, tmp_path / "sft", show_progress=False)
    model = nanochat.load(tmp_path / "base")
    x, y = next(TokenLoader(data.train, BASE.batch_size, MODEL.sequence_len))
    with torch.no_grad():
        parallel = F.cross_entropy(snlp.forward(model, x, plan).logits.flatten(0, 1), y.flatten()).item()
        sequential = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert tuned["train"][0]["ce"] == pytest.approx(parallel, rel=1e-6) and abs(parallel - sequential) > 1e-3
    assert tuned["train"][0]["ce"] < base["train"][0]["ce"]  # it starts from the trained weights
    with pytest.raises(ValueError, match="holds a model of another config"):
        other = dataclasses.replace(cfg, model=dataclasses.replace(MODEL, n_layer=2))
        train(other, data, tmp_path / "x", show_progress=False)


def test_fine_tuning_skips_the_steps_whose_solve_diverged(data, tmp_path, capsys):
    train(BASE, data, tmp_path / "base", show_progress=False)
    diverging = snlp.Plan(n_par=3, iters=2, jacobian=ls.Scaled(1e9))
    cfg = dataclasses.replace(BASE, sft_plan=diverging, init_from=str(tmp_path / "base"))
    metrics = train(cfg, data, tmp_path / "sft", show_progress=True)
    assert [r["skipped"] for r in metrics["train"]] == [True] * BASE.steps
    assert metrics["skipped_steps"] == BASE.steps
    assert json.loads((tmp_path / "sft" / "metrics.json").read_text())["skipped_steps"] == BASE.steps
    assert "skipped=6" in capsys.readouterr().err  # the progress bar shows the count
    base, tuned = nanochat.load(tmp_path / "base"), nanochat.load(tmp_path / "sft")
    assert all(torch.equal(base.state_dict()[k], v) for k, v in tuned.state_dict().items())  # no update


SMALL = ["--depth", "2", "--width", "64", "--seq-len", "32", "--vocab-size", "512", "--batch-size", "2",
         "--eval-every", "0", "--eval-tokens", "256", "--save-every", "1"]


def test_ctrl_c_on_the_command_line_saves_and_resumes(data, cache, tmp_path):
    """`snlp train` stopped by SIGINT: exit 130, the message, no traceback; the directory holds the checkpoint and
    the tokenizer, `--resume` continues from it, and `generate` loads it."""
    env = {**os.environ, "SNLP_CACHE": str(cache),  # the tokenizer and streams the `data` fixture cached
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    command = [sys.executable, "-m", "models.tools.cli"]
    out = tmp_path / "run"
    process = subprocess.Popen([*command, "train", "--out", str(out), "--steps", "400", *SMALL], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "model_000001.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    match = re.search(r"interrupted at step (\d+); continue with --resume", err)
    assert match and "Traceback" not in err, err
    step = int(match.group(1))
    assert nanochat.steps(out)[-1] == step < 400 and (out / "tokenizer" / "tokenizer.pkl").exists()

    resumed = subprocess.run([*command, "train", "--out", str(out), "--steps", str(step + 2), "--resume", *SMALL],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert nanochat.steps(out)[-1] == step + 2 and [r["step"] for r in metrics["train"]] == list(range(step + 2))
    generated = subprocess.run([*command, "generate", str(out), "--max-new", "4"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0 and generated.stdout.startswith("ROMEO."), generated.stderr
