"""The `snlp` command line."""

import json

import pytest

from models import cli


def test_demo_writes_results(tmp_path, capsys):
    assert cli.main(["demo", "--out", str(tmp_path), "--layers", "6", "--width", "4"]) == 0
    results = json.loads((tmp_path / "demo.json").read_text())
    assert results["config"]["layers"] == 6
    assert {r["solver"] for r in results["runs"]} >= {"Jacobi", "Identity (IDN)", "Exact (krylov)"}
    for run in results["runs"]:
        assert run["result"] == "CONVERGED" and run["error"][-1] <= 1e-9 and run["iterations"] <= 6
    assert (tmp_path / "demo_convergence.png").stat().st_size > 1000
    assert "max relative error over layers" in capsys.readouterr().out


def test_unknown_option_is_refused(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["demo", "--bogus"])
    assert info.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_later_subcommands_say_so(capsys):
    assert cli.main(["train"]) == 2
    assert "not implemented yet" in capsys.readouterr().err


def test_bad_sizes(capsys):
    assert cli.main(["demo", "--layers", "0"]) == 2
    assert "--layers and --width must be positive" in capsys.readouterr().err


def test_bench_writes_a_table_and_json(tmp_path, capsys):
    assert cli.main(["bench", "--out", str(tmp_path), "--depth", "4", "--width", "64", "--tokens", "32",
                     "--repeats", "1"]) == 0
    results = json.loads((tmp_path / "bench.json").read_text())
    assert {"device", "torch", "warmup", "repeats", "shape", "rows"} <= set(results)
    names = [r["case"] for r in results["rows"]]
    assert names[0] == "sequential" and len(names) == 7 and results["rows"][0]["speedup"] == 1.0
    assert all(r["median_s"] > 0 for r in results["rows"])
    assert "speedup" in capsys.readouterr().out


def test_bench_refuses_bad_sizes(capsys):
    assert cli.main(["bench", "--width", "100"]) == 2
    assert "--width must be a multiple of 64" in capsys.readouterr().err
