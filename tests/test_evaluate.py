"""Evaluation: what perplexity and bits per byte count, the unigram baseline, and how the grid reports solves."""

import math

import pytest
import torch

import layersolve as ls
from helpers import random_model, tiny_config
from models.inference import snlp
from models.training import evaluate
from models.training.data import TokenStream
from models.training.evaluate import Validation

VOCAB, BOS = 100, 99


def synthetic_stream(seed: int, length: int = 321) -> tuple[TokenStream, torch.Tensor]:
    """A stream with a document (BOS) every 7 tokens, and bytes per token in 1..3 (0 for BOS)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, BOS, (length,), generator=g)
    tokens[::7] = BOS
    token_bytes = torch.randint(1, 4, (VOCAB,), generator=g, dtype=torch.int32)
    token_bytes[BOS] = 0
    return TokenStream(tokens.int(), int(token_bytes[tokens].sum())), token_bytes


@pytest.fixture(scope="module")
def val():
    stream, token_bytes = synthetic_stream(0)
    return Validation(stream, token_bytes, batch_size=2, seq_len=16, max_tokens=96)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(), seed=0)


def test_perplexity_counts_the_targets_that_enter_the_loss(model, val):
    """Loss = sum of -log p(target) over non-BOS targets / their count; bpb divides the same nats by their bytes."""
    nats, count, nbytes, positions = 0.0, 0, 0, 0
    for x, y in val.batches():
        logp = torch.log_softmax(model(x), dim=-1).gather(-1, y[..., None])[..., 0]
        text = y != BOS
        nats, count = nats - float(logp[text].sum()), count + int(text.sum())
        nbytes, positions = nbytes + int(val.token_bytes[y].sum()), positions + y.numel()
    assert 0 < count < positions  # some targets are BOS
    quality = evaluate.sequential_metrics(model, val)
    assert quality["tokens"] == count
    assert quality["loss"] == pytest.approx(nats / count, rel=1e-12)
    assert quality["ppl"] == pytest.approx(math.exp(nats / count), rel=1e-12)
    assert quality["bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-12)


def test_unigram_baseline_is_over_the_same_targets(val):
    train, _ = synthetic_stream(1, length=2000)
    counts = torch.bincount(train.tokens.long(), minlength=VOCAB).double() + 1
    logp = (counts / counts.sum()).log()
    targets = torch.cat([y.flatten() for _, y in val.batches()])
    text = targets[targets != BOS]
    assert evaluate.unigram_loss(train, val) == pytest.approx(float(-logp[text].mean()), rel=1e-14)


def test_grid_rows_carry_the_solve_result_and_mark_failures(model, val):
    plans = {"IDN n4 K1": snlp.Plan(n_par=4),
             "Scaled(1e6) n4 K2": snlp.Plan(n_par=4, iters=2, jacobian=ls.Scaled(1e6))}  # forced to diverge
    rows = evaluate.grid(model, val, plans, progress=lambda line: None)
    assert "result" not in rows["sequential"]
    good, bad = rows["IDN n4 K1"], rows["Scaled(1e6) n4 K2"]
    assert (good["result"], good["failed_batches"], good["batches"]) == ("COMPLETED", 0, 3)
    assert (bad["result"], bad["failed_batches"], bad["batches"]) == ("DIVERGED", 3, 3)
    table = evaluate.grid_table(rows).splitlines()
    line = {name: next(t for t in table if t.startswith(name)) for name in rows}
    assert line["Scaled(1e6) n4 K2"].endswith("DIVERGED ! 3/3 batches")
    assert line["IDN n4 K1"].endswith("COMPLETED") and "!" not in line["IDN n4 K1"]
    assert table[-1].startswith("!: the solve did not end ok")
    assert "!" not in evaluate.grid_table({k: rows[k] for k in ("sequential", "IDN n4 K1")})


def test_the_row_reports_the_worst_result_over_batches(model, val, monkeypatch):
    forward, ended = snlp.forward, iter([ls.Result.COMPLETED, ls.Result.MAX_ITERS, ls.Result.FELL_BACK])

    def reporting(*args, **kwargs):
        out = forward(*args, **kwargs)
        return snlp.Output(out.logits, next(ended), out.stats)

    monkeypatch.setattr(snlp, "forward", reporting)
    row = evaluate.plan_metrics(model, val, snlp.Plan(n_par=2))
    assert (row["result"], row["failed_batches"], row["batches"]) == ("MAX_ITERS", 1, 3)


def test_row_20_every_perplexity_is_printed_with_its_token_count_and_context(model, val):
    """Issue 26 row 20: one checkpoint gave three validation PPLs and no output said how many tokens each used."""
    printed = []
    rows = evaluate.grid(model, val, {"IDN n3 K1 repeat": snlp.Plan(n_par=3, iters=1)}, printed.append)
    tokens = rows["sequential"]["quality"]["tokens"]
    assert rows["sequential"]["quality"]["context"] == 16
    assert f"ppl {rows['sequential']['quality']['ppl']:.3f} over {tokens:,} tokens at context 16" in printed[0]
    assert f"over {tokens:,} text tokens in sequences of 16 (the context)" in evaluate.grid_table(rows)
