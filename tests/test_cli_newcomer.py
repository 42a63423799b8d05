"""The command line as a newcomer meets it: one test per defect a new user found (issue 14's list, by number), each
through `cli.main` as the command line calls it."""

import json
import os
import subprocess
from pathlib import Path

import pytest

from models import nanochat, snlp
from models.tools import cli, study
from models.training import loop

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--depth", "4", "--width", "64", "--seq-len", "32", "--vocab-size", "512", "--batch-size", "4",
         "--eval-tokens", "512", "--eval-every", "0"]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """One tokenizer and token cache for the module (what SNLP_CACHE holds for a user)."""
    directory = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "CACHE", directory)
        yield directory


def refused(argv, capsys) -> str:
    """The error of a command argparse refuses (exit 2), as the user sees it."""
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def idn_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "idn"
    assert cli.main(["train", "--reg", "idn", "--n-par-configs", "2", "--steps", "4", "--out", str(out), *SMALL]) == 0
    return out


def copy_run(run: Path, to: Path) -> Path:
    subprocess.run(["cp", "-r", str(run), str(to)], check=True)
    return to


def test_1_resume_takes_the_runs_own_settings(idn_run, tmp_path, capsys):
    run = copy_run(idn_run, tmp_path / "idn")
    assert cli.main(["train", "--resume", "--steps", "6", "--out", str(run)]) == 0  # no other flag needed
    metrics = json.loads((run / "metrics.json").read_text())
    assert nanochat.steps(run)[-1] == 6 and metrics["config"]["regularizer"]["n_par_configs"] == [2]
    assert cli.main(["train", "--resume", "--steps", "8", "--reg-lambda", "2", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--reg-lambda 2.0 (the run has 1.0)" in err and "leave these out" in err


def test_2_checkpoints_are_saved_periodically_by_default(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--steps", "10", "--out", str(out), *SMALL]) == 0
    assert nanochat.steps(out) == [8, 9, 10]  # every tenth of the run, the newest 3 kept


def test_3_zero_or_negative_steps_are_refused_before_any_work(tmp_path, capsys):
    for steps in ("0", "-3"):
        err = refused(["train", "--steps", steps, "--out", str(tmp_path / "run"), *SMALL], capsys)
        assert f"argument --steps: must be an integer >= 1, got '{steps}'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, option, allowed", [
    (["train", "--depth", "0"], "--depth", "an integer >= 1"),
    (["train", "--depth", "-2"], "--depth", "an integer >= 1"),
    (["demo", "--toy", "--width", "0"], "--width", "an integer >= 1"),
    (["demo", "--toy", "--depth", "-1"], "--depth", "an integer >= 1"),
    (["train", "--reg-lambda", "-1"], "--reg-lambda", "a number >= 0.0"),
    (["train", "--reg-warmup", "1.5"], "--reg-warmup", "a number in [0.0, 1.0]"),
    (["train", "--reg-lambda", "nan"], "--reg-lambda", "a number >= 0.0"),
    (["bench", "--repeats", "0"], "--repeats", "an integer >= 1"),
    (["eval", "run", "--iters", "-1"], "--iters", "an integer >= 0"),
    (["generate", "run", "--temperature", "-0.5"], "--temperature", "a number >= 0.0"),
])
def test_4_numeric_options_are_checked_at_the_edge(argv, option, allowed, capsys):
    assert f"argument {option}: must be {allowed}" in refused(argv, capsys)


def test_4_a_width_the_heads_do_not_divide_is_refused(tmp_path, capsys):
    assert cli.main(["train", "--width", "100", "--out", str(tmp_path / "run")]) == 2
    assert "--width must be a multiple of 64 (heads of 64), got 100" in capsys.readouterr().err


def test_5_a_plan_the_model_cannot_take_fails_before_training(tmp_path, capsys, monkeypatch):
    def no_work(*args):
        raise AssertionError("the corpus was prepared for a run that cannot be trained")

    monkeypatch.setattr(loop.Data, "prepare", no_work)
    assert cli.main(["train", "--sft-n-par", "9", "--out", str(tmp_path / "run"), *SMALL]) == 2
    assert "n_par must be an int in [1, 4]" in capsys.readouterr().err
    too_long = {"IDN n9": snlp.Plan(n_par=9)}
    monkeypatch.setattr(study, "study_plans", lambda config: too_long)
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), *SMALL]) == 2
    assert "n_par must be an int in [1, 4]" in capsys.readouterr().err


def test_5_a_one_layer_demo_runs(tmp_path):
    assert cli.main(["demo", "--eager-baseline", "--depth", "1", "--steps", "2", "--out", str(tmp_path / "demo"), *SMALL[2:]]) == 0
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["models"]["baseline"]["n_par"] == 1


def test_6_each_demo_job_writes_its_own_folder_and_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["demo", "--toy", "--depth", "4", "--width", "4"]) == 0
    assert (tmp_path / "snlp-out" / "demo-toy" / "toy.json").exists()
    assert not (tmp_path / "snlp-out" / "demo").exists()  # the full demo's folder is the full demo's alone
    assert cli.main(["demo", "--toy", "--depth", "4", "--width", "4", "--out", "snlp-out/demo"]) == 0
    assert not (tmp_path / "snlp-out" / "demo" / "demo.json").exists()  # same --out: still not demo.json


def test_7_a_finished_run_is_not_mixed_with_a_new_one(idn_run, tmp_path, capsys):
    run = copy_run(idn_run, tmp_path / "idn")
    assert cli.main(["train", "--steps", "2", "--out", str(run), *SMALL]) == 2
    err = capsys.readouterr().err
    assert f"out_dir {run} is not empty" in err and "--resume" in err and "--overwrite" in err
    assert nanochat.steps(run) == nanochat.steps(idn_run)
    assert cli.main(["train", "--steps", "2", "--overwrite", "--out", str(run), *SMALL]) == 0
    assert nanochat.steps(run) == [1, 2] and len(json.loads((run / "metrics.json").read_text())["train"]) == 2
    assert cli.main(["train", "--resume", "--overwrite", "--out", str(run)]) == 2
    assert "give one of them" in capsys.readouterr().err


def test_8_checkpoints_are_rotated(tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--steps", "6", "--save-every", "1", "--keep", "2", "--out", str(out), *SMALL]) == 0
    assert nanochat.steps(out) == [5, 6]
    assert sorted(p.name for p in out.glob("optim_*")) == ["optim_000005_rank0.pt", "optim_000006_rank0.pt"]
    assert sorted(p.name for p in out.glob("meta_*")) == ["meta_000005.json", "meta_000006.json"]


def test_9_resume_removes_the_temporaries_of_an_interrupted_save(idn_run, tmp_path):
    run = copy_run(idn_run, tmp_path / "idn")
    orphan = run / ".model_000006.pt.k2j4x9.tmp"  # what SIGKILL during write_atomic leaves
    orphan.write_bytes(b"\0" * 1024)
    assert cli.main(["train", "--resume", "--steps", "5", "--out", str(run)]) == 0
    assert not orphan.exists() and nanochat.steps(run)[-1] == 5


def test_10_a_corrupt_checkpoint_is_named_without_torchs_advice(idn_run, tmp_path, capsys):
    run = copy_run(idn_run, tmp_path / "idn")
    model = nanochat.paths(run, 4)[0]
    model.write_bytes(os.urandom(4096))
    assert cli.main(["eval", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{model}: corrupt or not a model checkpoint" in err
    assert "weights_only" not in err and "Traceback" not in err
    run = copy_run(idn_run, tmp_path / "optim")
    (run / "optim_000004_rank0.pt").write_bytes(b"not a pickle")
    assert cli.main(["train", "--resume", "--steps", "5", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "optim_000004_rank0.pt: corrupt or not an optimizer checkpoint" in err and "weights_only" not in err


def test_11_every_table_times_plans_one_way_and_says_so(idn_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert cli.main(["eval", str(idn_run), "--iters", "0", "1", "--strategies", "idn", "--max-tokens", "256",
                     "--batch-size", "2", "--ar-prompts", "0", "--repeats", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert set(results["grid"]) == {"sequential", "IDN n2 K0 repeat (initial guess only)", "IDN n2 K1 repeat"}
    assert all("speedup" not in cell for cell in results["grid"].values())  # quality only: no second timing
    speed = results["speed"]
    base = speed["baseline_case"]  # the default baseline: the faster of the eager and the compiled forward
    assert base == min(("sequential", "sequential compiled"), key=lambda c: speed["rows"][c]["median_s"])
    assert speed["baseline"].startswith(f"fastest sequential forward: {base} (batch 1 x 32 tokens")
    assert speed["repeats"] == 2 and speed["rows"][base]["speedup"] == 1.0
    assert f"speedup: the median time of the fastest sequential forward: {base} (batch 1 x 32 tokens" in text
    assert "max layer err: the largest relative error" in text and "K0: the initial guess only" in text
    row = next(line for line in text.splitlines() if line.startswith("IDN n2 K1 repeat "))
    assert f"{speed['rows']['IDN n2 K1 repeat']['speedup']:.2f}x" in row  # the table prints the JSON's figure


def test_12_committed_demo_results_say_which_commit_made_them():
    """The committed demo results come from committed code, which they name (report and JSON alike)."""
    results = ROOT / "benchmarks" / "results" / "cpu-demo-tiny"
    commit = json.loads((results / "demo.json").read_text())["environment"]["commit"]
    assert commit and not commit.endswith("+dirty")
    assert f"code at commit {commit}" in (results / "report.md").read_text()
    assert len(commit) == 40 and int(commit, 16) >= 0
    shallow = subprocess.run(["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True, text=True)
    if shallow.stdout.strip() == "false":  # a shallow clone lacks the history to look the commit up in
        known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT, capture_output=True)
        assert known.returncode == 0, f"{commit} is not a commit of this repository"


# 13 (the demo retrains everything on a second run): tests/test_cli.py::test_demo_pipeline_on_a_small_config runs
# the demo twice through cli.main and asserts that the second run reuses both trained runs.
# 14 (the README's examples and commands): tests/test_readme.py runs its Python blocks and its command lines as
# written, the torchrun line among them, which prints the final line once (rank 0).
