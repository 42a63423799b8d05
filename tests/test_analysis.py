"""analysis: tables and plots from Stats."""

import json

import layersolve as ls
from analysis import convergence_record, convergence_table, plot_convergence
from helpers import random_state, residual_system


def runs():
    system, h0 = residual_system(12, 3, seed=0), random_state((3,), seed=0)
    reference = system.sequential(h0)
    return {name: ls.solve(system, h0, ls.Newton(jacobian=j), reference=reference, tol=1e-10).stats
            for name, j in (("idn", ls.Identity()), ("newton", ls.Exact()))}


def test_table_and_record():
    stats = runs()
    table = convergence_table(stats, columns=4)
    lines = table.splitlines()
    assert lines[1].split()[:2] == ["solve", "k=0"] and lines[1].split()[-2:] == ["iters", "final"]
    newton_row = next(line for line in lines if line.startswith("newton"))
    assert int(newton_row.split()[-2]) == stats["newton"].iterations
    record = convergence_record(stats["idn"])
    assert len(record["error"]) == stats["idn"].iterations + 1 and record["error"][-1] <= 1e-9
    json.dumps(record)


def test_plot(tmp_path):
    fig = plot_convergence(runs(), title="t")
    [ax] = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["idn", "newton"]
    assert ax.get_title() == "t"

