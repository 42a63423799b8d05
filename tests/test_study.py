"""The study (`snlp study`, `snlp demo`): its report and figures give one set of numbers (issue 26 row 17), on a
random float64 model and a synthetic validation stream, so every number is exact."""

import json

import pytest
import torch

import layersolve as ls
from helpers import random_model, tiny_config
from models.tools import study
from models.training import evaluate
from test_evaluate import synthetic_stream


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    stream, token_bytes = synthetic_stream(0)
    val = evaluate.Validation(stream, token_bytes, batch_size=2, seq_len=16, max_tokens=96)  # 3 batches of 2
    model = random_model(tiny_config(n_layer=6), seed=0)
    out = tmp_path_factory.mktemp("study")
    res = study.run({"random": model}, val, out, cfg=study.StudyConfig(timing_repeats=1, timing_warmup=0, timing_compile=False),
                    progress=lambda _: None)
    return res, out


def test_row_17_the_convergence_figures_and_the_grid_give_one_set_of_numbers(results):
    """The convergence solves read the grid's batches: the figure's iterate k is the grid's K = k plan, and the
    worst over batches is what the grid's max layer err reports."""
    res, out = results
    model = res["models"]["random"]
    assert res["sequences"] == 6
    for label in study.CONVERGENCE:
        curve = model["convergence"][label]["error"]
        for k in (1, 2):
            row = model["grid"][f"{label} n3 K{k} repeat"]
            assert curve[k] == pytest.approx(max(row["layer_error"]), rel=1e-12)
    assert json.loads((out / "study.json").read_text())["sequences"] == 6


def test_row_17_the_report_says_what_its_tables_count(results):
    """No "tail n = 3" beside an n6 row, no legend for an absent K0 row, the sequences and tokens named."""
    res, out = results
    report = (out / "report.md").read_text()
    assert "IDN n6 K1 repeat" in report and "tail n =" not in report
    assert "K0" not in report
    tokens = res["models"]["random"]["grid"]["sequential"]["quality"]["tokens"]
    assert f"over {tokens:,} validation text tokens in 6 sequences of 16 tokens" in report


def test_stats_worst_is_the_evaluations_max_over_batches():
    """Per iterate and layer the largest error and residual, the smallest exact prefix; a solve that stopped earlier
    keeps its last row."""
    def made(error, prefix):
        error = torch.tensor(error, dtype=torch.float64)
        return ls.Stats(residual=error.clone(), error=error, exact_prefix=torch.tensor(prefix),
                        contraction=torch.zeros(len(error) - 1, error.shape[1], dtype=torch.float64),
                        iterations=len(error) - 1, evaluations=len(error), jvps=0, inner_iterations=0,
                        depth=len(error), prefix_tol=1e-8)

    a = made([[1.0, 2.0], [0.0, 0.5], [0.0, 0.0]], [0, 1, 2])
    b = made([[3.0, 1.0], [0.0, 0.25]], [0, 0])
    worst = ls.Stats.worst([a, b])
    torch.testing.assert_close(worst.error, torch.tensor([[3.0, 2.0], [0.0, 0.5], [0.0, 0.25]], dtype=torch.float64))
    assert worst.exact_prefix.tolist() == [0, 0, 0] and worst.iterations == 2
    with pytest.raises(ValueError, match="same number of layers"):
        ls.Stats.worst([a, made([[1.0]], [0])])
