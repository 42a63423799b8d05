"""The claims table: each verdict follows its stated rule, on hand-made study results."""

import copy

import pytest

from models.tools import claims


def _model(seq_ppl, gaps, jacobi_error, speedups, n_par=4, exact_top1=1.0, exact_error=1e-6):
    """A study's record of one model: grid rows at the given PPL gaps, Jacobi's error per iterate, plan speeds."""
    grid = {"sequential": {"quality": {"ppl": seq_ppl}}}
    for plan, gap in gaps.items():
        grid[plan] = {"quality": {"ppl": seq_ppl * (1 + gap)}, "top1_agreement": 0.9, "layer_error": [0.1]}
    for plan in (f"Jacobi n{n_par} K{n_par} repeat", f"IDN n{n_par} K{n_par} repeat"):
        grid[plan] = {"quality": {"ppl": seq_ppl}, "top1_agreement": exact_top1, "layer_error": [exact_error]}
    rows = {"sequential": {"speedup": 1.0}, **{plan: {"speedup": s} for plan, s in speedups.items()}}
    return {"n_par": n_par, "grid": grid, "convergence": {"Jacobi": {"error": jacobi_error}},
            "speed": {"baseline": "eager sequential forward, batch 1 x 64 tokens, this machine", "rows": rows}}


def results():
    base = _model(100.0, {"IDN n4 K1 repeat": 0.30, "IDN n4 K2 repeat": 0.10, "Jacobi n4 K1 repeat": 2.0},
                  [0.5, 0.9, 0.7, 0.2, 0.0], {"IDN n4 K1 repeat": 1.5, "IDN n4 K2 repeat": 1.1})
    reg = _model(102.0, {"IDN n4 K1 repeat": 0.03, "IDN n4 K2 repeat": 0.01, "Jacobi n4 K1 repeat": 1.5},
                 [0.4, 0.6, 0.3, 0.1, 0.0], {"IDN n4 K1 repeat": 1.45, "IDN n4 K2 repeat": 1.1})
    return {"baseline": "base", "models": {"base": base, "reg": reg}}


def verdicts(res):
    return {row["claim"]: row["agrees"] for row in claims.assess(res)}


def test_one_row_per_claim_and_each_agrees_by_its_rule():
    rows = claims.assess(results())
    assert len(rows) == 5 and all(row["agrees"] is True for row in rows), rows
    table = claims.table(rows)
    assert table.count("**agrees**") == 5 and len(table.splitlines()) == 7
    speed = rows[-1]["ours"]
    assert "fastest accurate IDN n4 K1 repeat 1.45x (PPL +3.0%)" in speed and "baseline: eager" in speed


@pytest.mark.parametrize("break_it, claim", [
    (lambda r: r["models"]["reg"]["convergence"]["Jacobi"].update(error=[0.4, 0.3, 0.2, 0.1, 0.0]),
     "Jacobi is unstable on trained models"),
    (lambda r: r["models"]["reg"]["grid"]["IDN n4 K2 repeat"]["quality"].update(ppl=102.0 * 1.06)
     or r["models"]["reg"]["grid"]["IDN n4 K1 repeat"]["quality"].update(ppl=102.0 * 1.07),
     "IDN with regularization is accurate in 1 to 2 iterations"),
    (lambda r: r["models"]["reg"]["grid"]["sequential"]["quality"].update(ppl=106.0),
     "Regularization: little or no cost in sequential PPL, a smaller K = 1 gap"),
    (lambda r: r["models"]["reg"]["grid"]["IDN n4 K1 repeat"]["quality"].update(ppl=102.0 * 1.31),
     "Regularization: little or no cost in sequential PPL, a smaller K = 1 gap"),
    (lambda r: r["models"]["base"]["grid"]["IDN n4 K4 repeat"].update(top1_agreement=0.999),
     "K = n_par recovers the sequential output exactly"),
    (lambda r: r["models"]["reg"]["grid"]["Jacobi n4 K4 repeat"].update(layer_error=[1e-3]),
     "K = n_par recovers the sequential output exactly"),
    (lambda r: r["models"]["reg"]["speed"]["rows"]["IDN n4 K1 repeat"].update(speedup=1.39),
     "SNLP is faster than the sequential forward"),
])
def test_a_result_against_the_claim_disagrees(break_it, claim):
    res = copy.deepcopy(results())
    break_it(res)
    got = verdicts(res)
    assert got[claim] is False, got  # (other claims may share the figure: the speed claim needs an accurate plan)


def test_without_a_baseline_the_regularization_claim_is_not_assessed():
    res = results()
    res["baseline"] = None
    rows = {row["claim"]: row for row in claims.assess(res)}
    row = rows["Regularization: little or no cost in sequential PPL, a smaller K = 1 gap"]
    assert row["agrees"] is None and "--baseline" in row["ours"]
    assert "not assessed" in claims.table(list(rows.values()))
