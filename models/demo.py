"""The toy demo: every Jacobian strategy on one random stack of residual MLP blocks, to exactness.

It shows the invariants a user should see: every solve reaches the sequential trace (to rounding) in at most L
iterations; surrogates that match the block's structure need fewer; exact Newton converges quadratically."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

import layersolve as ls
from analysis import convergence_record, convergence_table, plot_convergence, write_json


@dataclass(frozen=True)
class ToyConfig:
    layers: int = 24
    width: int = 32
    batch: int = 8
    residual_scale: float = 0.9  # a_l of h -> a_l h + g(h): Scaled(a) is then exact on the skip path
    branch_gain: float = 0.4
    seed: int = 0


def toy_system(cfg: ToyConfig) -> tuple[ls.LayerSystem, torch.Tensor]:
    """Blocks h -> a h + gain * W2 relu(W1 h) / sqrt(width) on states (batch, width), float64."""
    g = torch.Generator().manual_seed(cfg.seed)
    w1 = torch.randn(cfg.layers, 2 * cfg.width, cfg.width, generator=g, dtype=torch.float64) / cfg.width**0.5
    w2 = torch.randn(cfg.layers, cfg.width, 2 * cfg.width, generator=g, dtype=torch.float64) / (2 * cfg.width)**0.5
    scales = torch.full((cfg.layers,), cfg.residual_scale, dtype=torch.float64)

    def block(p, h):  # h: (batch, width)
        return p["a"] * h + cfg.branch_gain * torch.relu(h @ p["w1"].T) @ p["w2"].T

    system = ls.LayerSystem.from_function(block, {"w1": w1, "w2": w2, "a": scales}, scales=scales)
    h0 = torch.randn(cfg.batch, cfg.width, generator=g, dtype=torch.float64)
    return system, h0


SOLVERS = {
    "Jacobi": ls.Jacobi(),
    "Identity (IDN)": ls.Newton(jacobian=ls.Identity()),
    "Scaled (true a)": ls.Newton(jacobian=ls.Scaled()),
    "Diagonal (4 probes)": ls.Newton(jacobian=ls.Diagonal(probes=4)),
    "Exact (krylov)": ls.Newton(jacobian=ls.Exact(method="krylov")),
}


def run(out_dir: Path, cfg: ToyConfig = ToyConfig(), tol: float = 1e-10) -> dict:
    system, h0 = toy_system(cfg)
    reference = system.sequential(h0)
    runs, rows = {}, []
    for i, (name, solver) in enumerate(SOLVERS.items(), start=1):
        start = time.perf_counter()
        sol = ls.solve(system, h0, solver, tol=tol, reference=reference, throw=False)
        seconds = time.perf_counter() - start
        runs[name] = sol.stats
        rows.append({"solver": name, "result": sol.result.name, "seconds": seconds, **convergence_record(sol.stats)})
        print(f"[{i}/{len(SOLVERS)}] {name:<20} {sol.result.name:<10} iterations={sol.stats.iterations:>3} "
              f"final error={float(sol.stats.error[-1].max()):.1e}  ({seconds:.2f} s)", flush=True)
    print()
    print(convergence_table(runs))
    results = {"config": cfg.__dict__, "tol": tol, "runs": rows}
    write_json(out_dir / "demo.json", results)
    plot_convergence(runs, out_dir / "demo_convergence.png",
                     title=f"{cfg.layers} residual blocks, width {cfg.width}: error vs sequential")
    print(f"\nwrote {out_dir / 'demo.json'} and {out_dir / 'demo_convergence.png'}")
    return results
