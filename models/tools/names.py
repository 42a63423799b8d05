"""The command line's names for library objects, one table each: strategy names to Jacobian strategies, the
default tail lengths of the regularizer and the demo, and plans to the SNLP-style row names of tables and JSON.
The one place where such strings and defaults are mapped."""

from __future__ import annotations

import dataclasses

import layersolve as ls

# Command-line names of the surrogates (SNLP's where it has one). Strategies are frozen, so one object serves all.
STRATEGIES: dict[str, ls.Jacobian] = {
    "jacobi": ls.Zero(),
    "idn": ls.Identity(),
    "scaled": ls.Scaled(),
    "hcn": ls.Mixing(),
    "diagonal": ls.Diagonal(probes=4),
}

# Row names of the surrogates in tables and JSON (SNLP's names where it has them).
LABELS: dict[type, str] = {ls.Zero: "Jacobi", ls.Identity: "IDN", ls.Scaled: "Scaled", ls.Mixing: "HCN",
                           ls.Diagonal: "Diag", ls.Exact: "Exact"}


def strategy(name: str, probes: int | None = None) -> ls.Jacobian:
    """The strategy called `name` in STRATEGIES; `probes` replaces the Hutchinson probe count of "diagonal" (the
    other strategies draw no probes and ignore it)."""
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {name!r}")
    jacobian = STRATEGIES[name]
    if probes is not None and isinstance(jacobian, ls.Diagonal):
        return dataclasses.replace(jacobian, probes=probes)
    return jacobian


def n_par_configs(n_layer: int, quarters: tuple[int, ...] = (1, 2, 3)) -> tuple[int, ...]:
    """Default tail lengths: q L / 4 for each q in `quarters` (SNLP's 8, 16, 24 of 32 layers by default), rounded
    down, at least 1, ascending, without repeats. The regularizer and `snlp bench --train` take all three; the demo
    takes quarters (1, 2), L/4 and L/2, to halve its training cost."""
    if not isinstance(n_layer, int) or n_layer < 1:
        raise ValueError(f"n_layer must be a positive int, got {n_layer!r}")
    if not quarters or any(q not in (1, 2, 3, 4) for q in quarters):
        raise ValueError(f"quarters must be a non-empty tuple of 1, 2, 3 or 4, got {quarters!r}")
    return tuple(sorted({max(1, q * n_layer // 4) for q in quarters}))


def plan_name(plan) -> str:
    """SNLP-style names: 'IDN n8 K2 repeat' (the tail), 'IDN n8@12 K1 repeat' (the segment of 8 blocks from block
    12), '4xF2 IDN n8 K1 one_step', 'IDN n8 K0 repeat (initial guess only)'."""
    fused = f"{plan.n_par // plan.fuse}xF{plan.fuse} " if plan.fuse > 1 else ""
    init = plan.init if isinstance(plan.init, str) else type(plan.init).__name__.lower()
    label = LABELS.get(type(plan.jacobian), type(plan.jacobian).__name__)
    at = "" if plan.start is None else f"@{plan.start}"
    guess_only = " (initial guess only)" if plan.iters == 0 else ""
    return f"{fused}{label} n{plan.n_par}{at} K{plan.iters} {init}{guess_only}"
