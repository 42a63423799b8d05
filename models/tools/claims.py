"""The paper's claims (SNLP, arXiv 2605.17842, v2) beside ours: one row per claim, with the paper's figure, our
tiny-scale result from a study (`study.run`), and whether it agrees by a rule stated in the row.

Our models are tiny and run on a CPU at short context; the paper's are 0.5B-3B on H100s at 2048 tokens. The rules
ask the qualitative question each claim makes, with the thresholds in ACCURATE and EXACT.
"""

from __future__ import annotations

import math

import layersolve as ls

from ..inference import snlp
from .names import plan_name

ACCURATE = 0.05  # "accurate": validation perplexity within 5% of the sequential forward's
EXACT = 1e-4  # "exact" in float32: every tail layer's relative error below this, and top-1 agreement 1
PAPER_SPEEDUP = 1.40  # the paper's accurate plan: 1xF12 n12 K1, 1.40x over eager sequential at PPL -0.1%


def _name(n_par: int, jacobian: ls.Jacobian, iters: int) -> str:
    return plan_name(snlp.Plan(n_par=n_par, jacobian=jacobian, iters=iters))


def _gap(model: dict, plan: str) -> float:
    """The plan's perplexity over the sequential one, minus 1 (NaN when the grid has no such plan)."""
    row = model["grid"].get(plan)
    return row["quality"]["ppl"] / model["grid"]["sequential"]["quality"]["ppl"] - 1 if row else math.nan


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:+.1f}%"


def _row(claim: str, paper: str, ours: str, agrees: bool | None, rule: str) -> dict:
    return {"claim": claim, "paper": paper, "ours": ours, "agrees": agrees, "rule": rule}


def jacobi_unstable(models: dict) -> dict:
    ours, verdicts = [], []
    for name, m in models.items():
        error = m["convergence"]["Jacobi"]["error"]  # max relative error over the tail, per iterate
        before_exact = error[1:m["n_par"]]
        peak = max(before_exact, default=math.nan)
        verdicts.append(bool(before_exact) and peak > error[0])
        ours.append(f"{name}: error {error[0]:.2g} at the guess, peak {peak:.2g} before K = n; K1 PPL "
                    f"{_pct(_gap(m, _name(m['n_par'], ls.Zero(), 1)))} (IDN {_pct(_gap(m, _name(m['n_par'], ls.Identity(), 1)))})")
    return _row("Jacobi is unstable on trained models",
                "naive fixed-point (Jacobi) iteration is unstable on trained Transformers (abstract)", "; ".join(ours),
                all(verdicts) if verdicts else None,
                "Jacobi's error against the sequential trace grows past the initial guess's before K = n, on every "
                "model")


def idn_accurate(models: dict, studied: list[str]) -> dict:
    ours, verdicts = [], []
    for name in studied:
        m = models[name]
        gaps = [_gap(m, _name(m["n_par"], ls.Identity(), k)) for k in (1, 2)]
        ours.append(f"{name}: IDN n{m['n_par']} K1 {_pct(gaps[0])}, K2 {_pct(gaps[1])}")
        verdicts.append(min((g for g in gaps if not math.isnan(g)), default=math.inf) <= ACCURATE)
    return _row("IDN with regularization is accurate in 1 to 2 iterations",
                "3B IDN-regularized n8 K1: PPL +3.9%; 0.5B n12 K2 (one_step): +1.5%", "; ".join(ours),
                all(verdicts) if verdicts else None,
                f"PPL within {ACCURATE:.0%} of sequential at K = 1 or 2, on every regularized model")


def regularization(models: dict, baseline: str | None, studied: list[str]) -> dict:
    claim = "Regularization: little or no cost in sequential PPL, a smaller K = 1 gap"
    paper = ("sequential PPL at 2048 tokens about equal or slightly worse (0.5B: 15.21 -> 15.36, +1.0%; v1 at 128 "
             "tokens: 4.7-23.4% lower); the regularized models are accurate at K = 1-2, the 0.5B baseline is "
             "reported at K = 4 only (n8: +1.4%)")
    rule = (f"the regularized sequential PPL is at most {ACCURATE:.0%} above the baseline's, and its IDN K1 PPL gap "
            "is smaller than the baseline's")
    if baseline is None or not studied:
        return _row(claim, paper, "no baseline model to compare with (snlp study --baseline CHECKPOINT)", None, rule)
    base = models[baseline]
    base_ppl = base["grid"]["sequential"]["quality"]["ppl"]
    base_gap = _gap(base, _name(base["n_par"], ls.Identity(), 1))
    ours, verdicts = [], []
    for name in studied:
        m = models[name]
        ppl = m["grid"]["sequential"]["quality"]["ppl"]
        gap = _gap(m, _name(m["n_par"], ls.Identity(), 1))
        ours.append(f"sequential PPL {baseline} {base_ppl:.2f} -> {name} {ppl:.2f} ({_pct(ppl / base_ppl - 1)}); "
                    f"IDN K1 gap {baseline} {_pct(base_gap)} -> {name} {_pct(gap)}")
        verdicts.append(ppl / base_ppl - 1 <= ACCURATE and gap < base_gap)
    return _row(claim, paper, "; ".join(ours), all(verdicts), rule)


def exact_at_n(models: dict) -> dict:
    ours, verdicts = [], []
    for name, m in models.items():
        for label, jacobian in (("Jacobi", ls.Zero()), ("IDN", ls.Identity())):
            row = m["grid"][_name(m["n_par"], jacobian, m["n_par"])]
            error = max(row["layer_error"])
            ours.append(f"{name} {label}: top-1 {row['top1_agreement']:.3f}, max layer error {error:.1e}")
            verdicts.append(row["top1_agreement"] == 1.0 and error <= EXACT)
    return _row("K = n_par recovers the sequential output exactly",
                "exact convergence recovers the sequential computation (abstract); finite termination after n "
                "iterations", "; ".join(ours), all(verdicts),
                f"top-1 agreement 1 and every tail layer's relative error <= {EXACT:g} (float32), for every "
                "strategy and model")


def speedup(models: dict, studied: list[str]) -> dict:
    ours, verdicts = [], []
    for name in studied:
        m = models[name]
        speed = m["speed"]
        rows = {plan: row for plan, row in speed["rows"].items() if plan in m["grid"] and plan != "sequential"}
        best = max(rows, key=lambda p: rows[p]["speedup"])
        accurate = [p for p in rows if _gap(m, p) <= ACCURATE]
        fast = max(accurate, key=lambda p: rows[p]["speedup"], default=None)
        text = f"{name}: fastest {best} {rows[best]['speedup']:.2f}x (PPL {_pct(_gap(m, best))})"
        if fast is not None:
            text += f", fastest accurate {fast} {rows[fast]['speedup']:.2f}x (PPL {_pct(_gap(m, fast))})"
        ours.append(text + f"; baseline: {speed['baseline']}")
        verdicts.append(fast is not None and rows[fast]["speedup"] >= PAPER_SPEEDUP)
    return _row("SNLP is faster than the sequential forward",
                "0.5B no x0/ve, H100, T 2048, batch 1, over eager sequential: 12xF2 n24 K1 2.58x (PPL +17%); "
                "1xF12 n12 K1 1.40x (PPL -0.1%)", "; ".join(ours), all(verdicts) if verdicts else None,
                f"a plan within {ACCURATE:.0%} PPL reaches the paper's {PAPER_SPEEDUP:.2f}x over the fastest "
                "sequential way here (eager or compiled; the paper's figures are over its eager forward)")


def assess(results: dict) -> list[dict]:
    """The claims table of a study's results (see study.run)."""
    models, baseline = results["models"], results.get("baseline")
    studied = [name for name in models if name != baseline]
    return [jacobi_unstable(models), idn_accurate(models, studied), regularization(models, baseline, studied),
            exact_at_n(models), speedup(models, studied)]


def verdict(agrees: bool | None) -> str:
    return {True: "agrees", False: "disagrees", None: "not assessed"}[agrees]


def table(rows: list[dict]) -> str:
    """A markdown table: claim, the paper's figure, ours, agree / disagree, and the rule."""
    lines = ["| claim | paper | ours | verdict | rule |", "|---|---|---|---|---|"]
    lines += [f"| {r['claim']} | {r['paper']} | {r['ours']} | **{verdict(r['agrees'])}** | {r['rule']} |"
              for r in rows]
    return "\n".join(lines)
