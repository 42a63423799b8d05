"""analysis: tables, plots and atomic writes from Stats."""

import json
import os

import pytest

import layersolve as ls
from analysis import convergence_record, convergence_table, plot_convergence, write_atomic, write_json
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
    plot_convergence(runs(), tmp_path / "curves.png", title="t")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "r.json"
    write_json(path, {"a": 1})

    def interrupted(f):
        f.write(b'{"a": 2, "trunc')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, interrupted)  # the old file must survive whole
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left behind
