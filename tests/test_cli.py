"""The `snlp` command line."""

import json

import pytest

import layersolve as ls
from models.tools import claims, cli
from models.tools.names import STRATEGIES, n_par_configs, strategy


def test_toy_demo_writes_results(tmp_path, capsys):
    assert cli.main(["demo", "--toy", "--out", str(tmp_path), "--depth", "6", "--width", "4"]) == 0
    results = json.loads((tmp_path / "toy.json").read_text())
    assert results["config"]["layers"] == 6
    assert {r["solver"] for r in results["runs"]} >= {"Jacobi", "Identity (IDN)", "Exact (GMRES)"}
    for run in results["runs"]:
        assert run["result"] == "CONVERGED" and run["error"][-1] <= 1e-9 and run["iterations"] <= 6
    assert (tmp_path / "toy_convergence.png").stat().st_size > 1000
    assert "max relative error over layers" in capsys.readouterr().out


def test_unknown_option_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--bogus"])
    assert info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_strategy_names():
    assert {name: type(strategy(name)) for name in STRATEGIES} == {
        "jacobi": ls.Zero, "idn": ls.Identity, "scaled": ls.Scaled, "hcn": ls.Mixing, "diagonal": ls.Diagonal}
    assert strategy("diagonal", probes=2) == ls.Diagonal(probes=2) and strategy("diagonal").probes == 4
    assert strategy("idn", probes=2) == ls.Identity()
    with pytest.raises(ValueError, match="strategy must be one of .*'idn'.*, got 'newton'"):
        strategy("newton")


def test_default_tail_lengths():
    assert n_par_configs(32) == (8, 16, 24) and n_par_configs(8, quarters=(1, 2)) == (2, 4)
    assert n_par_configs(2) == (1,) and n_par_configs(1) == (1,)
    for bad in ({"n_layer": 0}, {"n_layer": 8, "quarters": ()}, {"n_layer": 8, "quarters": (5,)}):
        with pytest.raises(ValueError):
            n_par_configs(**bad)


def test_train_flags_take_the_default_tail_lengths():
    args = cli._parser().parse_args(["train", "--reg", "diagonal", "--reg-probes", "3", "--depth", "8"])
    reg = cli.train_config(args).regularizer
    assert reg.n_par_configs == (2, 4, 6) and reg.jacobian == ls.Diagonal(probes=3)


def test_an_unknown_command_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["serve"])
    assert info.value.code == 2 and "invalid choice: 'serve'" in capsys.readouterr().err


SMALL = ["--steps", "4", "--depth", "4", "--width", "64", "--seq-len", "32", "--vocab-size", "512",
         "--eval-tokens", "1024", "--eval-every", "2"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert cli.main(["train", "--out", str(out), "--reg", "idn", "--n-par-configs", "2", *SMALL]) == 0
    return out


def test_train_writes_a_run(trained_run):
    assert (trained_run / "model_000004.pt").exists() and (trained_run / "tokenizer" / "tokenizer.pkl").exists()
    metrics = json.loads((trained_run / "metrics.json").read_text())
    assert metrics["config"]["regularizer"]["n_par_configs"] == [2] and len(metrics["evals"]) == 2


def test_bench_of_a_trained_run_gives_accuracy_beside_speed(trained_run, tmp_path, capsys):
    """`snlp bench RUN`: every timed plan has held-out PPL and top-1 agreement beside its speedup."""
    assert cli.main(["bench", str(trained_run), "--eager-baseline", "--tokens", "16", "--repeats", "1",
                     "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    grid, speed = results["grid"], results["speed"]["rows"]
    assert {"sequential", "IDN n2 K1 repeat", "Jacobi n2 K1 repeat"} <= set(grid) <= set(speed)
    assert all(cell["quality"]["context"] == 16 and cell["quality"]["ppl"] > 1 and 0 <= cell["top1_agreement"] <= 1
               for cell in grid.values())
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("IDN n2 K1 repeat "))
    assert f"{grid['IDN n2 K1 repeat']['quality']['ppl']:.3f}" in row and f"{speed['IDN n2 K1 repeat']['speedup']:.2f}x" in row


def test_eval_json_fields(trained_run, capsys):
    out = trained_run / "eval.json"
    assert cli.main(["eval", str(trained_run), "--eager-baseline", "--iters", "1", "2", "--max-tokens", "512", "--batch-size", "4",
                     "--ar-prompts", "2", "--ar-new", "4", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    grid = results["grid"]
    assert set(grid) == {"sequential", "Jacobi n2 K1 repeat", "Jacobi n2 K2 repeat", "IDN n2 K1 repeat",
                         "IDN n2 K2 repeat"}
    for name, cell in grid.items():
        assert {"loss", "ppl", "bpb", "tokens"} <= set(cell["quality"]) and cell["quality"]["tokens"] == 512
        assert {"top1_agreement", "mean_cosine"} <= set(cell)
        assert results["speed"]["rows"][name]["speedup"] > 0  # timed by bench.speedups, as every table
        if name != "sequential":
            assert len(cell["layer_error"]) == 2
    assert grid["IDN n2 K2 repeat"]["top1_agreement"] == 1.0  # K = n_par is exact
    assert set(results["autoregressive_agreement"]) == set(grid) - {"sequential"}
    assert "IDN n2 K2 repeat" in capsys.readouterr().out


def test_generate(trained_run, capsys):
    assert cli.main(["generate", str(trained_run), "--max-new", "5", "--n-par", "2", "--iters", "2"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO.")


@pytest.mark.parametrize("argv, message", [
    (["train", "--preset", "huge"], "invalid choice: 'huge'"),
    (["train", "--reg-typo", "1"], "unrecognized arguments: --reg-typo"),
])
def test_unknown_preset_or_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_bad_corpus_and_vocabulary(trained_run, tmp_path, capsys):
    assert cli.main(["train", "--out", str(tmp_path / "x"), "--corpus", str(tmp_path / "missing"), *SMALL]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    assert cli.main(["train", "--out", str(tmp_path / "x"), "--corpus", str(tmp_path / "empty.txt"), *SMALL]) == 2
    assert "empty" in capsys.readouterr().err.lower()
    other = tmp_path / "other"
    other.mkdir()
    for f in trained_run.glob("*_000004.*"):
        (other / f.name).write_bytes(f.read_bytes())
    from models.training.data import load_corpus
    from models.training.tokenizer import train_tokenizer
    train_tokenizer([load_corpus(None).texts[0][:50000]], 300).save(other / "tokenizer")
    assert cli.main(["eval", str(other)]) == 2
    assert "has 300 tokens but the model's vocab_size is 512" in capsys.readouterr().err


def test_demo_pipeline_on_a_small_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "CACHE", tmp_path / "cache")
    assert cli.main(["demo", "--eager-baseline", "--out", str(tmp_path / "demo"), *SMALL]) == 0
    report = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert set(report["models"]) == {"baseline", "idn-regularized"}
    grid = report["models"]["baseline"]["grid"]
    assert {"IDN n2 K2 repeat", "Jacobi n2 K1 repeat", "IDN n2 K1 one_step", "IDN n4 K1 repeat"} <= set(grid)
    assert "n_par_configs=(1, 2)" in report["about"]["regularizer"]  # L/4 and L/2 of 4 layers
    assert [row["claim"] for row in report["claims"]] == [row["claim"] for row in claims.assess(report)]
    assert not any(run["reused"] for run in report["about"]["runs"].values())
    for name in ("report.md", *report["figures"]):
        assert (tmp_path / "demo" / name).stat().st_size > 100
    text = (tmp_path / "demo" / "report.md").read_text()
    assert text.count("| ") > 5 * 5 and "![frontier.png](frontier.png)" in text
    # Again: both runs are reused (same config, data and code), and the study gives the same grid.
    assert cli.main(["demo", "--eager-baseline", "--out", str(tmp_path / "again"), *SMALL]) == 0
    again = json.loads((tmp_path / "again" / "demo.json").read_text())
    assert all(run["reused"] for run in again["about"]["runs"].values())
    assert again["models"]["baseline"]["grid"]["IDN n2 K1 repeat"]["quality"] == grid["IDN n2 K1 repeat"]["quality"]
    # Another config is another run.
    assert cli.main(["demo", "--eager-baseline", "--out", str(tmp_path / "other"), *SMALL, "--seed", "1"]) == 0
    other = json.loads((tmp_path / "other" / "demo.json").read_text())
    assert not any(run["reused"] for run in other["about"]["runs"].values())


def test_study_on_any_checkpoint(trained_run, tmp_path, capsys):
    assert cli.main(["study", str(trained_run), "--eager-baseline", "--out", str(tmp_path / "s"), "--max-tokens", "1024"]) == 0
    results = json.loads((tmp_path / "s" / "study.json").read_text())
    rows = {row["claim"]: row for row in results["claims"]}
    assert rows["Regularization: little or no cost in sequential PPL, a smaller K = 1 gap"]["agrees"] is None
    assert "training.png" in results["figures"] and (tmp_path / "s" / "report.md").exists()
    assert "[not assessed] Regularization" in capsys.readouterr().out
    baseline = tmp_path / "base"
    baseline.mkdir()
    for f in trained_run.glob("*_000004.*"):
        (baseline / f.name).write_bytes(f.read_bytes())
    (baseline / "tokenizer").mkdir()
    for f in (trained_run / "tokenizer").iterdir():
        (baseline / "tokenizer" / f.name).write_bytes(f.read_bytes())
    assert cli.main(["study", str(trained_run), "--eager-baseline", "--baseline", str(baseline), "--out", str(tmp_path / "b"),
                     "--max-tokens", "1024"]) == 0
    results = json.loads((tmp_path / "b" / "study.json").read_text())
    assert list(results["models"]) == ["base", trained_run.name] and results["baseline"] == "base"
    assert cli.main(["study", str(trained_run), "--baseline", str(trained_run)]) == 2
    assert "same directory name" in capsys.readouterr().err
