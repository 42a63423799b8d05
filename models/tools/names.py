"""The command line's names for library objects: strategy names to Jacobian strategies, and plans to the
SNLP-style row names of tables and JSON. The one place where such strings are mapped."""

from __future__ import annotations

import layersolve as ls


def strategy(name: str, probes: int = 4) -> ls.Jacobian:
    """Command-line names of the surrogates (SNLP's where it has one)."""
    table = {"jacobi": ls.Zero(), "idn": ls.Identity(), "scaled": ls.Scaled(), "hcn": ls.Mixing(),
             "diagonal": ls.Diagonal(probes=probes)}
    return table[name]


STRATEGIES = ("jacobi", "idn", "scaled", "hcn", "diagonal")


def plan_name(plan) -> str:
    """SNLP-style names: 'IDN n8 K2 repeat', '4xF2 IDN n8 K1 one_step'."""
    names = {ls.Zero: "Jacobi", ls.Identity: "IDN", ls.Scaled: "Scaled", ls.Mixing: "HCN", ls.Diagonal: "Diag",
             ls.Exact: "Exact"}
    fused = f"{plan.n_par // plan.fuse}xF{plan.fuse} " if plan.fuse > 1 else ""
    init = plan.init if isinstance(plan.init, str) else type(plan.init).__name__.lower()
    return f"{fused}{names.get(type(plan.jacobian), type(plan.jacobian).__name__)} n{plan.n_par} K{plan.iters} {init}"
