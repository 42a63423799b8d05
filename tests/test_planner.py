"""`snlp plan` (models.tools.planner): the candidate segments the profile proposes, the ranking and the
recommendation under a PPL budget, the budget flag, and the command end to end on a small trained run."""

import argparse
import json

import pytest

from models.tools import cli, planner

SMALL = ["--depth", "6", "--width", "64", "--seq-len", "32", "--vocab-size", "512", "--batch-size", "4",
         "--eval-tokens", "512", "--eval-every", "0"]


def test_candidates_are_the_tail_and_the_quietest_windows():
    #          block: 0    1    2     3     4     5    6    7
    profile = [9.0, 2.0, 0.01, 0.02, 0.01, 0.5, 0.9, 0.8]
    segments = planner.candidate_segments(profile, lengths=(3,), per_length=1)
    # the window 2-4 sums blocks 3, 4 (0.03); 1-3 sums 2, 3 (0.03) too and ties break to the earlier start
    assert segments == [range(1, 4), range(5, 8)]
    segments = planner.candidate_segments(profile, lengths=(2, 3), per_length=2)
    assert segments == [range(1, 3), range(3, 5), range(6, 8), range(1, 4), range(2, 5), range(5, 8)]
    assert planner.candidate_segments(profile, lengths=(8,), per_length=2) == [range(0, 8)]  # only the tail


def test_default_lengths_are_eighths_of_the_depth():
    assert planner.default_lengths(30) == (3, 7, 11, 15)
    assert planner.default_lengths(6) == (2, 3)
    assert planner.default_lengths(2) == (2,)


def row(n, k, gap, start=0, result="COMPLETED"):
    return {"plan": f"n{n}@{start} K{k}", "n_par": n, "iters": k, "ppl_gap": gap, "result": result,
            "start": start, "stop": start + n, "tail": False}


def test_ranking_puts_the_longest_cheapest_plan_within_budget_first():
    rows = [row(2, 1, 0.001), row(4, 2, 0.02), row(4, 1, 0.029), row(8, 1, 0.5), row(6, 1, 0.05),
            row(6, 1, 0.001, result="DIVERGED")]
    ranked = planner.ranked(rows, budget=0.03)
    assert [(r["n_par"], r["iters"]) for r in ranked[:3]] == [(4, 1), (4, 2), (2, 1)]
    assert [r["ppl_gap"] for r in ranked[3:]] == [0.001, 0.05, 0.5]  # outside: a failed solve, then by gap
    assert [(r["n_par"], r["iters"]) for r in planner.ranked(rows, budget=0.1)[:2]] == [(6, 1), (4, 1)]


def test_the_budget_flag_reads_percentages_and_fractions():
    assert planner.budget("3%") == pytest.approx(0.03) and planner.budget("0.1") == 0.1
    for bad in ("-1%", "three", "nan", "inf%"):
        with pytest.raises(argparse.ArgumentTypeError, match="percentage"):
            planner.budget(bad)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "small"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "CACHE", tmp_path_factory.mktemp("cache"))
        assert cli.main(["train", "--reg", "idn", "--n-par-configs", "3", "--steps", "30", "--out", str(out),
                         *SMALL]) == 0
    return out


@pytest.mark.parametrize("budget", ["1000%", "0%"])  # every plan within; only the plans no worse than sequential
def test_snlp_plan_ranks_middle_segments_and_recommends_within_budget(run, tmp_path, capsys, monkeypatch, budget):
    monkeypatch.setattr(cli, "CACHE", tmp_path / "cache")
    out = tmp_path / "plan.json"
    assert cli.main(["plan", str(run), "--eager-baseline", "--budget", budget, "--max-tokens", "256", "--batch-size", "4",
                     "--repeats", "1", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    results = json.loads(out.read_text())
    rows, limit = results["rows"], planner.budget(budget)
    assert len(results["profile"]) == 6 and results["context"] == 32
    middle = [r for r in rows if not r["tail"]]
    assert middle and all(0 < r["stop"] < 6 for r in middle)  # middle segments are probed, and printed
    assert all(f" {planner.segment_text(r):<13} {r['n_par']:>3} " in text for r in middle)
    inside = [r for r in rows if planner.within(r, limit)]
    best = results["recommendation"]
    if best is None:
        assert not inside and "no plan is within" in text
    else:
        assert best["ppl_gap"] <= limit and best == rows[0]
        assert best["n_par"] == max(r["n_par"] for r in inside)
        assert best["iters"] == min(r["iters"] for r in inside if r["n_par"] == best["n_par"])
        assert rows[:len(inside)] == inside  # within the budget first
        assert f"recommended: layers {planner.segment_text(best)}" in text
    assert out.with_suffix(".md").read_text().count("\n") > len(rows) and out.with_suffix(".png").stat().st_size


def test_snlp_plan_refuses_bad_flags(run, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["plan", str(run), "--budget", "lots"])
    assert info.value.code == 2 and "argument --budget: must be a percentage" in capsys.readouterr().err
    assert cli.main(["plan", str(run), "--lengths", "7"]) == 2
    assert "lengths must be segment lengths in [1, 6]" in capsys.readouterr().err


def test_segment_flags_are_checked_by_name(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "CACHE", tmp_path / "cache")
    assert cli.main(["eval", str(run), "--eager-baseline", "--n-par", "3", "--start", "4", "--iters", "1", "--max-tokens", "64",
                     "--repeats", "1", "--ar-prompts", "0", "--out", str(tmp_path / "e.json")]) == 2
    assert "--n-par 3 --start 4: Plan.start=4 with n_par=3" in capsys.readouterr().err
    assert cli.main(["generate", str(run), "--start", "2", "--max-new", "2"]) == 2
    assert "--start 2 is the first block of the parallel segment: give --n-par too" in capsys.readouterr().err
    assert cli.main(["bench", "--preset", "tiny", "--start", "1", "--out", str(tmp_path / "b")]) == 2
    assert "--start does nothing without a run or --hf" in capsys.readouterr().err
    assert cli.main(["eval", str(run), "--eager-baseline", "--n-par", "3", "--start", "1", "--iters", "1", "--max-tokens", "256",
                     "--repeats", "1", "--ar-prompts", "0", "--out", str(tmp_path / "e.json")]) == 0
    assert set(json.loads((tmp_path / "e.json").read_text())["grid"]) == {"sequential", "IDN n3@1 K1 repeat",
                                                                          "Jacobi n3@1 K1 repeat"}
    assert cli.main(["generate", str(run), "--n-par", "3", "--start", "1", "--iters", "3", "--max-new", "4",
                     "--temperature", "0"]) == 0
