"""`snlp generate --speculative` and the speculative benchmark rows: what they print and return, the speedup's
reference (sequential decoding timed in the same call), and bad arguments refused by name (no timing asserted)."""

import re

import pytest
import torch

import layersolve as ls
from helpers import random_model, tiny_config, tokens
from models.inference import snlp, speculative
from models.tools import bench, cli, speculation, suite

SMALL = ["--steps", "2", "--depth", "4", "--width", "64", "--seq-len", "32", "--vocab-size", "512",
         "--eval-tokens", "1024", "--eval-every", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", "--out", str(out), *SMALL]) == 0
    return out


def _numbers(text: str) -> dict[str, float]:
    patterns = {"acceptance": r"acceptance rate ([\d.]+)", "length": r"mean accepted length ([\d.]+)",
                "rate": r"([\d.]+) tokens/s", "sequential": r"against ([\d.]+) sequential",
                "speedup": r"speedup ([\d.]+)x"}
    return {name: float(re.search(pattern, text).group(1)) for name, pattern in patterns.items()}


def test_greedy_speculative_generation_prints_text_and_statistics(run, capsys):
    assert cli.main(["generate", str(run), "--speculative", "--draft-len", "3", "--temperature", "0",
                     "--max-new", "12"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO.") and "IDN n2 K1 repeat drafting B = 3" in text  # the default plan: L/2, K1, IDN
    numbers = _numbers(text)
    assert 0 <= numbers["acceptance"] <= 1 and 1 <= numbers["length"] <= 3
    assert numbers["speedup"] == pytest.approx(numbers["rate"] / numbers["sequential"], rel=0.02, abs=0.01)
    assert "the tokens equal sequential greedy decoding's" in text


def test_the_flags_choose_the_draft(run, capsys):
    assert cli.main(["generate", str(run), "--speculative", "--n-par", "4", "--iters", "2", "--strategy", "jacobi",
                     "--max-new", "6", "--seed", "3"]) == 0
    text = capsys.readouterr().out
    assert "Jacobi n4 K2 repeat drafting B = 4" in text and "greedy" not in text  # sampling: no token identity


@pytest.mark.parametrize("flags, message", [
    (["--draft-len", "0"], "argument --draft-len: must be an integer >= 1, got '0'"),
    (["--temperature", "-0.5"], "argument --temperature: must be a number >= 0.0, got '-0.5'"),
    (["--top-k", "-1"], "argument --top-k: must be an integer >= 0, got '-1'"),
])
def test_bad_numbers_are_refused_at_the_edge(run, capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", str(run), "--speculative", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--n-par", "5"], r"--n-par 5: Plan.n_par must be an int in \[1, 4\]"),
    (["--max-new", "400"], r"--prompt \(\d+ tokens\) and --max-new 400 exceed the model's rotary cache of 320"),
])
def test_bad_arguments_are_refused_by_name(run, capsys, flags, message):
    assert cli.main(["generate", str(run), "--speculative", *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_sequential_generation_keeps_its_defaults(run, capsys):
    """Without --speculative and --n-par nothing changes: sequential decoding, no statistics."""
    assert cli.main(["generate", str(run), "--max-new", "4"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("ROMEO.") and "speculative" not in text


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(sequence_len=64), seed=1, scale=0.4, dtype=torch.float32)


def test_speculative_rows_sweep_plans_lengths_and_temperatures(model):
    plans = {"IDN n4 K1": snlp.Plan(n_par=4, iters=1), "Jacobi n4 K1": snlp.Plan(n_par=4, iters=1, jacobian=ls.Zero())}
    rows = speculation.speculative_rows(model, tokens(1, 6, seed=2), 10, plans, draft_lens=(1, 3),
                                        temperatures=(0.0, 1.0), warmup=0, repeats=2, progress=lambda line: None)
    assert [(r["temperature"], r["plan"], r["draft_len"]) for r in rows] == [
        (t, name, b) for t in (0.0, 1.0) for name, b in
        (("sequential", None), ("IDN n4 K1", 1), ("IDN n4 K1", 3), ("Jacobi n4 K1", 1), ("Jacobi n4 K1", 3))]
    for row in rows:
        assert row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["tokens_per_s"] == pytest.approx(1 / row["median_s"])
        sequential = next(r for r in rows if r["temperature"] == row["temperature"] and r["draft_len"] is None)
        assert row["speedup"] == pytest.approx(sequential["median_s"] / row["median_s"])
        assert row["greedy_equal"] is (True if row["temperature"] == 0 else None)  # lossless: greedy is sequential
        if row["draft_len"] is None:
            assert row["acceptance_rate"] is None and row["mean_accepted_length"] is None
        else:
            assert 0 <= row["acceptance_rate"] <= 1 and 1 <= row["mean_accepted_length"] <= row["draft_len"]
    b1 = [r for r in rows if r["draft_len"] == 1]
    assert all(r["mean_accepted_length"] == 1 for r in b1)  # one token per round, whatever is accepted
    jacobi = next(r for r in rows if r["plan"] == "Jacobi n4 K1" and r["draft_len"] == 3 and r["temperature"] == 0)
    assert jacobi["acceptance_rate"] < 1  # rejections happen, so greedy_equal above is a test of rollbacks
    lines = bench.speculative_table(rows)
    assert len(lines) == len(rows) + 1 and lines[1].startswith("speculative T0 sequential")
    assert lines[3].split()[-1] == "yes" and lines[-1].split()[-1] == "-"


@pytest.mark.parametrize("name", ["sequential", "sequential graphed"])
def test_a_plan_named_like_a_sequential_row_is_refused(model, name):
    with pytest.raises(ValueError, match="are sequential decoding's rows"):
        speculation.speculative_rows(model, tokens(1, 4), 2, {name: snlp.Plan(n_par=2)})


def test_graphed_sequential_decoding_is_a_second_baseline(model, monkeypatch):
    """With graphed, sequential decoding runs again on a compiled-blocks copy with static caches (compiled before
    the sweep, its compile_s apart): same greedy tokens, and every row's speedup is over the faster of the two
    sequential rows of its temperature, named as its baseline. The clock is faked so that each timed call looks
    faster than the one before it: the graphed row (timed after the eager one) is then the baseline, which a
    speedup over the eager row alone would miss. compile_blocks is the identity here: what is tested is the
    choice of baseline, not the compiler."""
    monkeypatch.setattr(type(model), "compile_blocks", lambda self, mode=None: self)
    calls = iter(range(1, 10_000))

    def timer(device):
        return lambda fn: (fn(), 1.0 / next(calls))[1]

    monkeypatch.setattr(speculation, "timer", timer)
    rows = speculation.speculative_rows(model, tokens(1, 6, seed=2), 4, {"IDN n4 K1": snlp.Plan(n_par=4, iters=1)},
                                        draft_lens=(2,), temperatures=(0.0, 1.0), warmup=0, repeats=3,
                                        progress=lambda line: None, graphed=True)
    assert [(r["temperature"], r["plan"]) for r in rows] == [
        (t, name) for t in (0.0, 1.0) for name in ("sequential", "sequential graphed", "IDN n4 K1")]
    for t in (0.0, 1.0):
        group = [r for r in rows if r["temperature"] == t]
        assert all(r["baseline"] == f"speculative T{t:g} sequential graphed" for r in group)
        assert all(r["speedup"] == pytest.approx(group[1]["median_s"] / r["median_s"]) for r in group)
        assert group[1]["compile_s"] == 1.0 and all("compile_s" not in r for r in (group[0], group[2]))
    assert all(r["greedy_equal"] for r in rows if r["temperature"] == 0)


def test_compare_times_both_on_the_same_prompt(model):
    result = speculation.compare(model, tokens(1, 5, seed=4), 8, snlp.Plan(n_par=4, iters=1), draft_len=2)
    assert torch.equal(result.tokens, result.sequential_tokens) and result.stats.tokens == 8
    assert result.speedup == pytest.approx(result.sequential_seconds / result.seconds)


@pytest.mark.parametrize("layers", [1, 2, 8, 12, 32])
def test_the_suite_speculates_on_the_first_shape_with_plans_that_fit(layers):
    assert all(1 <= p.n_par <= layers for p in speculation.speculative_plans(layers))
    assert all(preset.speculation is not None for preset in suite.PRESETS.values())


def test_rows_compare_tokens_and_pool_seeds(model, monkeypatch):
    """With a draft that commits other tokens than sequential greedy decoding, greedy_equal is False and the
    table says so; repeat r runs seed + r, and the rows' statistics pool the repeats."""
    seeds = []

    def wrong(model, prompt, max_new, plan, draft_len, temperature, top_k, seed):
        seeds.append(seed)
        stats = speculative.SpeculationStats(rounds=2, drafted=4, accepted=seed % 2, tokens=max_new)
        return torch.zeros(1, max_new, dtype=torch.long) + seed, stats

    monkeypatch.setattr(speculation.speculative, "generate", wrong)
    rows = speculation.speculative_rows(model, tokens(1, 4), 3, {"fake": snlp.Plan(n_par=2)}, draft_lens=(2,),
                                        temperatures=(0.0,), warmup=1, repeats=3, seed=10, progress=lambda line: None)
    assert seeds == [10, 10, 11, 12]  # the warm-up, then the repeats
    fake = rows[1]
    assert fake["greedy_equal"] is False and bench.speculative_table(rows)[2].split()[-1] == "NO"
    assert fake["acceptance_rate"] == 1 / 12 and fake["mean_accepted_length"] == 9 / 6
