"""analysis.speculative: the series of speculative rows (per group, plan and temperature, by draft length, the
sequential rows left out) and the two-panel figure of acceptance and speedup."""

import pytest

from analysis import SpeculationSeries, plot_speculation, speculation_series
from test_analysis import check_style, legend_labels


def row(plan, B, temperature, accept=None, speedup=1.0, **extra):
    return {"case": f"speculative T{temperature:g} {plan} B{B}", "plan": plan, "draft_len": B,
            "temperature": temperature, "acceptance_rate": accept,
            "mean_accepted_length": None if B is None else B * accept, "speedup": speedup, **extra}


ROWS = [row("sequential", None, 0.0), row("IDN", 4, 0.0, 0.8, 1.3), row("IDN", 1, 0.0, 1.0, 0.7),
        row("IDN", 2, 0.0, 0.9, 1.1), row("sequential", None, 1.0), row("IDN", 2, 1.0, 0.6, 0.9),
        row("IDN", 1, 1.0, 0.7, 0.6), row("warm", 2, 0.0, 0.95, 1.2)]


def test_a_series_per_plan_and_temperature_by_draft_length():
    series = speculation_series(ROWS)
    assert [(s.plan, s.temperature) for s in series] == [("IDN", 0.0), ("IDN", 1.0), ("warm", 0.0)]
    idn = series[0]
    assert idn == SpeculationSeries("IDN", 0.0, "", (1, 2, 4), (1.0, 0.9, 0.8), (1.0, 1.8, 3.2), (0.7, 1.1, 1.3))
    assert series[1].draft_lens == (1, 2) and series[1].speedup == (0.6, 0.9)
    assert idn.label == "IDN, T=0" and series[1].label == "IDN, T=1"


def test_groups_keep_runs_apart_and_a_mixed_series_is_refused():
    rows = [row("IDN", 2, 0.0, 0.9, group="baseline"), row("IDN", 2, 0.0, 0.5, group="regularized")]
    series = speculation_series(rows)
    assert [s.label for s in series] == ["baseline: IDN, T=0", "regularized: IDN, T=0"]
    with pytest.raises(ValueError, match="two rows of .* at draft_len 2; give each run a 'group'"):
        speculation_series([row("IDN", 2, 0.0, 0.9), row("IDN", 2, 0.0, 0.5)])


def test_the_figure_draws_acceptance_and_speedup_against_B():
    fig = plot_speculation(ROWS, title="test")
    check_style(fig)
    accept, speed = fig.axes
    assert accept.get_xlabel() == speed.get_xlabel() == "draft length B (tokens)"
    assert "acceptance" in accept.get_ylabel() and "speedup" in speed.get_ylabel()
    assert [list(line.get_ydata()) for line in accept.get_lines()] == [[1.0, 0.9, 0.8], [0.7, 0.6], [0.95]]
    drawn = [list(line.get_ydata()) for line in speed.get_lines()]
    assert drawn[0] == [1.0, 1.0] and drawn[1:] == [[0.7, 1.1, 1.3], [0.6, 0.9], [1.2]]  # the 1.0x line first
    assert legend_labels(speed) == ["fastest sequential (1.0x)", "IDN, T=0", "IDN, T=1", "warm, T=0"]
    assert [line.get_linestyle() for line in speed.get_lines()[1:]] == ["-", "--", "-"]  # sampling dashed
    assert [t for t in accept.get_xticks()] == [1, 2, 4]


def test_rows_without_speculation_are_refused():
    with pytest.raises(ValueError, match="no speculative rows"):
        plot_speculation([row("sequential", None, 0.0)])
