"""analysis: the computing (per-layer curves, prefix fronts, frontier points from grids and bench rows, Pareto
fronts, surrogate errors, training curves) on real solves and small hand-made records, and the figures: what they
draw, their labels and legends, and the house style."""

import functools
import itertools
import json
import math

import matplotlib.text
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

import layersolve as ls
from analysis import (FrontierPoint, bench_points, convergence_record, convergence_table, frontier_points,
                      layer_curves, pareto_front, plot_convergence, plot_frontier, plot_heatmap,
                      plot_layer_convergence, plot_prefix_front, plot_surrogate_error, plot_training,
                      plot_update_profile, prefix_front,
                      surrogate_errors, training_curves)
from helpers import DTYPE, random_state, residual_system

NAN = float("nan")


@functools.cache
def runs():
    system, h0 = residual_system(12, 3, seed=0), random_state((3,), seed=0)
    reference = system.sequential(h0)
    return {name: ls.solve(system, h0, ls.Newton(jacobian=j), reference=reference, tol=1e-10).stats
            for name, j in (("idn", ls.Identity()), ("newton", ls.Exact()))}


def made_stats(residual, error=None, prefix=None) -> ls.Stats:
    """A Stats record with chosen numbers; the counters do not matter to the analysis."""
    residual = torch.tensor(residual, dtype=DTYPE)
    rows, layers = residual.shape
    prefix = torch.arange(rows).clamp(max=layers) if prefix is None else torch.tensor(prefix)
    return ls.Stats(residual=residual, error=None if error is None else torch.tensor(error, dtype=DTYPE),
                    exact_prefix=prefix, contraction=torch.full((rows - 1, layers), NAN, dtype=DTYPE),
                    iterations=rows - 1, evaluations=0, jvps=0, inner_iterations=0, depth=0, prefix_tol=1e-8)


# A stats record whose last residual row was not evaluated, and whose layer 1 is exactly 0 after one iteration.
MADE = made_stats([[1.0, 2.0, 4.0], [0.0, 0.5, 0.25], [0.0, 1e-3, 1e-2], [NAN, NAN, NAN]],
                  error=[[1.0, 1.0, 1.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1e-3], [0.0, 0.0, 0.0]], prefix=[0, 1, 2, 3])


def check_style(fig):
    """The house style: 8 x 5 in at 100 dpi, every text at least 9 pt, every axes labelled."""
    assert tuple(fig.get_size_inches()) == (8, 5) and fig.dpi == 100
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    assert sizes and min(sizes) >= 9
    for ax in fig.axes:
        assert ax.get_xlabel() or ax.get_ylabel(), "an axes without labels"


def legend_labels(ax) -> list[str]:
    legend = ax.get_legend()
    return [] if legend is None else [t.get_text() for t in legend.get_texts()]


# -- convergence ---------------------------------------------------------------------------------------------------

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


def test_layer_curves_are_the_stats_rows():
    for stats in runs().values():
        for quantity in ("residual", "error"):
            curves = layer_curves(stats, quantity)
            assert curves.dtype == torch.float64
            torch.testing.assert_close(curves, getattr(stats, quantity), equal_nan=True, rtol=0, atol=0)
    curves = layer_curves(MADE, "residual")
    curves[0, 0] = 99.0
    assert MADE.residual[0, 0] == 1.0  # a copy: the record stays as the solve wrote it
    with pytest.raises(ValueError, match="quantity must be one of"):
        layer_curves(MADE, "contraction")
    with pytest.raises(ValueError, match="no error: solve with reference="):
        layer_curves(made_stats([[1.0]]), "error")


def test_prefix_front_meets_finite_termination():
    assert prefix_front(MADE) == [(0, 0), (1, 1), (2, 2), (3, 3)]
    for stats in runs().values():
        front = prefix_front(stats)
        assert [k for k, _ in front] == list(range(stats.iterations + 1))
        assert all(p >= min(k, stats.num_layers) for k, p in front)
    assert prefix_front(runs()["newton"])[-1][1] == 12


def test_plot_convergence():
    fig = plot_convergence(runs(), title="t")
    [ax] = fig.axes
    assert [line.get_label() for line in ax.get_lines()] == ["idn", "newton"]
    assert legend_labels(ax) == ["idn", "newton"] and ax.get_title() == "t"
    assert ax.get_xlabel() == "iteration k" and ax.get_ylabel() == "relative error (max over layers)"
    np.testing.assert_array_equal(ax.get_lines()[0].get_ydata(),
                                  [max(row) if max(row) > 0 else NAN for row in runs()["idn"].error.tolist()])
    check_style(fig)


def test_plot_layer_convergence():
    fig = plot_layer_convergence(MADE, "residual", title="made")
    left, right = fig.axes[:2]
    lines = left.get_lines()
    assert len(lines) == 3 + 1 and legend_labels(left) == ["max over layers"]  # a line per layer and the max
    np.testing.assert_array_equal(lines[1].get_ydata(), [2.0, 0.5, 1e-3, NAN])
    np.testing.assert_array_equal(lines[0].get_ydata(), [1.0, NAN, NAN, NAN])  # 0 cannot be drawn on a log axis
    np.testing.assert_array_equal(lines[-1].get_ydata(), [4.0, 0.5, 1e-2, NAN])
    final, exact = right.get_lines()  # the last evaluated iterate: k = 2, the k = 3 row is NaN
    np.testing.assert_array_equal(final.get_xdata(), [1, 2, 3])
    np.testing.assert_array_equal(final.get_ydata(), [NAN, 1e-3, 1e-2])
    np.testing.assert_array_equal(exact.get_xdata(), [1])  # layer 1 is exactly 0: marked, not lost
    assert legend_labels(right) == ["> 0", "exactly 0"]
    assert "k=2" in right.get_title() and right.get_xlabel() == "layer l"
    assert any(ax.get_ylabel() == "layer l" for ax in fig.axes[2:])  # the colour bar names the layers
    check_style(fig)


def test_plot_heatmap():
    fig = plot_heatmap(MADE, "residual")
    ax = fig.axes[0]
    [image] = ax.get_images()
    data = image.get_array()
    expected = np.log10(np.array([[1.0, 2.0, 4.0], [NAN, 0.5, 0.25], [NAN, 1e-3, 1e-2]]))
    np.testing.assert_array_equal(data.mask, np.isnan(expected))  # the exact zeros are masked (grey)
    np.testing.assert_allclose(data.filled(NAN), expected, rtol=1e-15)
    assert image.get_extent() == [0.5, 3.5, 2.5, -0.5]  # columns at layers 1..3, rows at k = 0..2 from the top
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("layer l", "iteration k")
    assert fig.axes[1].get_ylabel() == "log10 relative residual (grey: exactly 0)"
    fig.canvas.draw()
    for ticks in (ax.get_xticks(), ax.get_yticks()):  # layers and iterations have no halves
        assert len(ticks) and all(float(t).is_integer() for t in ticks), ticks
    check_style(fig)


def test_row_18_the_heatmap_has_no_empty_row_and_numbers_the_models_layers():
    """Issue 26 row 18: the residual of the last iterate is not evaluated, which drew an all-grey row; a solve of
    a model's last layers was numbered 1..n instead of the model's own layer numbers."""
    fig = plot_heatmap(MADE, "residual", first_layer=6)  # the last 3 layers of an 8-layer model
    ax = fig.axes[0]
    data = ax.get_images()[0].get_array()
    assert not data.mask.all(axis=1).any()  # every row drawn holds a value
    assert ax.get_images()[0].get_extent() == [5.5, 8.5, 2.5, -0.5]
    assert ax.get_xlabel() == "layer l (of the model)"
    assert any("k=3" in t.get_text() and "not evaluated" in t.get_text() for t in ax.texts)  # the dropped row said
    error = plot_heatmap(MADE, "error").axes[0].get_images()[0].get_array()
    assert error.shape == (4, 3)  # the error of every iterate is known: no row is dropped


def test_plot_prefix_front():
    fig = plot_prefix_front({"made": MADE, **runs()})
    [ax] = fig.axes
    guarantee, *fronts = ax.get_lines()
    assert legend_labels(ax) == ["guaranteed: min(k, L) = made", "idn", "newton"]
    last = max(len(s.exact_prefix) for s in runs().values()) - 1
    np.testing.assert_array_equal(guarantee.get_ydata(), np.minimum(np.arange(last + 1), 12))
    np.testing.assert_array_equal(fronts[0].get_ydata(), [p for _, p in prefix_front(runs()["idn"])])
    assert ax.get_xlabel() == "iteration k"
    check_style(fig)
    past_depth = plot_prefix_front({"L=2": made_stats([[1.0, 1.0]] * 5)}).axes[0].get_lines()[0]
    np.testing.assert_array_equal(past_depth.get_ydata(), [0, 1, 2, 2, 2])  # the guarantee stops at L


def test_row_18_coinciding_prefix_fronts_are_named_together():
    """Issue 26 row 18: curves drawn over each other showed one colour with no note."""
    ahead = made_stats([[1.0, 1.0, 1.0]] * 3, prefix=[0, 2, 3])
    runs_ = {"a: Jacobi": MADE, "a: IDN": ahead, "b: Jacobi": MADE, "b: IDN": ahead}
    [ax] = plot_prefix_front(runs_).axes
    assert legend_labels(ax) == ["guaranteed: min(k, L) = a: Jacobi, b: Jacobi", "a: IDN, b: IDN (identical)"]
    assert len(ax.get_lines()) == 2  # one line per distinct front


# -- frontier ------------------------------------------------------------------------------------------------------

def quality(ppl):
    return {"loss": math.log(ppl), "ppl": ppl, "bpb": ppl / 10}


GRID = {
    "sequential": {"quality": quality(10.0), "top1_agreement": 1.0, "speedup": 1.0},
    "IDN n4 K1 repeat": {"quality": quality(12.0), "speedup": 1.8, "result": "COMPLETED", "failed_batches": 0},
    "IDN n4 K2 repeat": {"quality": quality(10.5), "speedup": 1.4, "result": "COMPLETED", "failed_batches": 0},
    "Jacobi n4 K1 repeat": {"quality": quality(40.0), "speedup": 1.7, "result": "COMPLETED", "failed_batches": 0},
    "IDN n4 K1 one_step": {"quality": quality(30.0), "speedup": 2.5, "result": "DIVERGED", "failed_batches": 2},
    "IDN n8 K1 repeat": {"quality": {"loss": NAN, "ppl": NAN, "bpb": NAN}, "speedup": NAN, "result": "NONFINITE",
                         "failed_batches": 1},
}


def test_frontier_points_from_a_grid():
    points = frontier_points(GRID, group="m")
    assert [p.name for p in points] == list(GRID) and {p.group for p in points} == {"m"}
    by_name = {p.name: p for p in points}
    assert by_name["sequential"] == FrontierPoint("sequential", 1.0, 10.0, "m", True)
    assert by_name["IDN n4 K2 repeat"] == FrontierPoint("IDN n4 K2 repeat", 1.4, 10.5, "m", True)
    assert not by_name["IDN n4 K1 one_step"].ok and by_name["IDN n4 K1 one_step"].measured
    assert not by_name["IDN n8 K1 repeat"].measured  # the NaN row is kept, marked unmeasured
    assert frontier_points(GRID, quality="bpb")[1].quality == pytest.approx(1.2)
    measured = frontier_points({**GRID, "sequential": {**GRID["sequential"], "speedup": 0.9}},
                               speedups={"IDN n4 K1 repeat": 3.0})
    assert [p.speedup for p in measured][:3] == [1.0, 3.0, pytest.approx(NAN, nan_ok=True)]  # missing: NaN
    with pytest.raises(ValueError, match=r"quality must be one of the grid's quality keys \['bpb', 'loss', 'ppl'\]"):
        frontier_points(GRID, quality="top1")


BENCH = [
    {"case": "sequential", "median_s": 1.0, "min_s": 0.9, "max_s": 1.1, "top1_agreement": 1.0,
     "max_abs_logit_diff": 0.0, "speedup": 1.0, "baseline": "sequential"},
    {"case": "IDN n6 K1 repeat", "median_s": 0.5, "min_s": 0.4, "max_s": 0.6, "top1_agreement": 0.9,
     "max_abs_logit_diff": 2.0, "result": "COMPLETED", "speedup": 2.0, "baseline": "sequential"},
    {"case": "IDN n6 K2 repeat", "median_s": 0.7, "min_s": 0.6, "max_s": 0.8, "top1_agreement": 0.99,
     "max_abs_logit_diff": 0.1, "result": "MAX_ITERS", "speedup": None, "baseline": "sequential"},
]


def test_bench_points():
    points = bench_points(BENCH, group="L6")
    assert points[1] == FrontierPoint("IDN n6 K1 repeat", 2.0, 2.0, "L6", True)
    assert not points[2].ok and math.isnan(points[2].speedup)  # MAX_ITERS: not ok; None: not measured
    agreement = bench_points(BENCH, quality="top1_agreement")
    assert [p.quality for p in agreement] == [1.0, 0.9, 0.99] and [p.speedup for p in agreement][:2] == [1.0, 2.0]


def point(name, speedup, quality, ok=True):
    return FrontierPoint(name, speedup, quality, ok=ok)


def test_pareto_front():
    points = [point("seq", 1.0, 10.0), point("a", 2.0, 12.0), point("b", 1.5, 12.0),  # b: slower, as good as a
              point("c", 2.0, 12.0), point("d", 3.0, 30.0), point("e", 3.0, 20.0),  # c ties a; e beats d
              point("f", 4.0, 5.0, ok=False), point("g", NAN, 1.0), point("h", 0.5, 9.0)]
    assert [p.name for p in pareto_front(points)] == ["h", "seq", "a", "c", "e"]
    assert [p.name for p in pareto_front(points, lower_is_better=False)] == ["d"]
    assert pareto_front([]) == [] and pareto_front([point("g", NAN, 1.0)]) == []
    grid = frontier_points(GRID)
    assert [p.name for p in pareto_front(grid)] == ["sequential", "IDN n4 K2 repeat", "IDN n4 K1 repeat"]


def dominates(a, b):
    return a.speedup >= b.speedup and a.quality <= b.quality and (a.speedup > b.speedup or a.quality < b.quality)


@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), max_size=12))
def test_pareto_front_is_undominated_and_covers_the_rest(coords):
    """No front point is dominated; every other point is dominated by a front point (small integer grids: ties)."""
    points = [point(str(i), float(s), float(q)) for i, (s, q) in enumerate(coords)]
    front = pareto_front(points)
    assert all(not dominates(p, f) for f in front for p in points)
    assert all(any(dominates(f, p) for f in front) for p in points if p not in front)
    assert [f.speedup for f in front] == sorted(f.speedup for f in front)


def test_plot_frontier():
    points = frontier_points(GRID, group="base") + [
        p for p in frontier_points({"sequential": GRID["sequential"], "IDN n4 K1 repeat": GRID["IDN n4 K1 repeat"]},
                                   group="reg")]
    fig = plot_frontier(points, "validation perplexity", title="f")
    [ax] = fig.axes
    assert legend_labels(ax) == ["sequential (1.0x)", "base: plans", "base: failed solves", "base: sequential",
                                 "base: Pareto front", "reg: plans", "reg: sequential", "reg: Pareto front"]
    assert ax.get_lines()[0].get_xdata()[0] == 1.0  # the 1.0x line
    base_front = ax.get_lines()[1]
    np.testing.assert_array_equal(base_front.get_xdata(), [1.0, 1.4, 1.8])
    offsets = [c.get_offsets() for c in ax.collections]
    assert sum(len(o) for o in offsets) == 5 + 2  # every measured point once: 5 of base (one unmeasured), 2 of reg
    named = [t.get_text() for t in ax.texts[1:]]  # the note; then the fronts' plans and the failed solves
    assert sorted(named) == sorted(["IDN n4 K2 repeat", "IDN n4 K1 repeat"]  # base's and reg's at one point: once
                                   + [p.name for p in points if not p.ok and p.measured]), named
    assert "1 plan(s) without a measured speedup or quality not shown" in ax.texts[0].get_text()
    assert ax.get_yscale() == "linear"  # 10 .. 40: within a factor 10
    assert ax.get_xlabel() == "speedup over sequential (x, baseline: sequential)"
    assert ax.get_ylabel() == "validation perplexity"
    check_style(fig)
    wide = plot_frontier([point("seq", 1.0, 10.0), point("a", 2.0, 500.0)]).axes[0]
    assert wide.get_yscale() == "log" and legend_labels(wide) == ["sequential (1.0x)", "plans", "Pareto front"]


# Two models of the study (issue 26, row 19): names that one fixed offset overprinted ("Jacobi n4 K1 repeatIDN n8 K1
# repeat"): the two models' "IDN n8 K1 repeat" at 1.21x and ppl 122 and 127, "Jacobi n4 K1 repeat" at 1.06x beside
# "IDN n4 K1 repeat" at 1.05x, failed solves next to the fronts; the quality axis is a log one (up to 1306).
CROWDED = [FrontierPoint(name, speedup, ppl, group, ok) for group, rows in {
    "baseline": [("sequential", 1.0, 95.98, True), ("Jacobi n4 K1 repeat", 1.06, 125.97, True),
                 ("IDN n4 K1 repeat", 1.05, 98.17, True), ("IDN n8 K1 repeat", 1.21, 126.63, True),
                 ("IDN n4 K2 repeat", 0.79, 96.02, True), ("IDN n8 K2 repeat", 0.52, 96.1, True),
                 ("Jacobi n8 K1 repeat", 1.22, 131.4, False), ("IDN n4 K1 one_step", 1.07, 101.2, False)],
    "idn-regularized": [("sequential", 1.0, 95.93, True), ("IDN n4 K1 repeat", 1.04, 96.03, True),
                        ("IDN n8 K1 repeat", 1.21, 122.59, True), ("Jacobi n4 K1 repeat", 1.05, 1305.9, True),
                        ("IDN n4 K2 repeat", 0.8, 95.95, True), ("Jacobi n8 K1 repeat", 1.2, 118.0, False)],
}.items() for name, speedup, ppl, ok in rows]


def overprinted(fig) -> list[tuple[str, str]]:
    """The pairs of the axes' texts and legend whose boxes overlap, as a saved or displayed figure draws them: each
    text's box alone, without the leader line to its point."""
    fig.draw_without_rendering()
    [ax] = fig.axes
    boxes = [(t.get_text(), matplotlib.text.Text.get_window_extent(t)) for t in ax.texts]
    boxes.append(("the legend", ax.get_legend().get_window_extent()))
    return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2) if box_a.overlaps(box_b)]


def front_and_failed(points) -> set[str]:
    """The names plot_frontier writes on its figure: each group's front plans (but sequential) and failed solves."""
    groups = {p.group for p in points}
    front = {p.name for group in groups for p in pareto_front([p for p in points if p.group == group])}
    return (front | {p.name for p in points if not p.ok}) - {"sequential"}


def test_plot_frontier_names_do_not_collide():
    """Every front plan and failed solve is named on the figure, and no two names, nor a name and the legend,
    overprint."""
    fig = plot_frontier(CROWDED, "validation perplexity")
    [ax] = fig.axes
    assert ax.get_yscale() == "log"
    assert overprinted(fig) == []
    names = [t.get_text() for t in ax.texts]
    assert len(front_and_failed(CROWDED)) == 5 and set(names) == front_and_failed(CROWDED), names
    # the two models' "IDN n8 K1 repeat" and "IDN n4 K1 repeat", a few points apart: one name each
    assert names.count("IDN n8 K1 repeat") == names.count("IDN n4 K1 repeat") == 1
    assert names.count("Jacobi n8 K1 repeat") == 2  # the two models' are far enough apart to be named apart
    check_style(fig)


def test_plot_frontier_numbers_names_with_no_room():
    """Failed solves in a row, closer than their names are long: those that find no room go by a number at the
    point, listed in the legend with their coordinates, and the legend moves out of the axes; names of one point
    share one label."""
    points = [point("sequential", 1.0, 10.0), point("IDN n4 K2 repeat", 1.5, 12.0),
              point("Jacobi n4 K2 repeat", 1.5, 12.0), point("IDN n8 K1 repeat", 2.5, 20.0)]
    points += [point(f"IDN n{i} K1 one_step", 1.5 + 0.05 * i, 15.0, ok=False) for i in range(5)]
    fig = plot_frontier(points)
    [ax] = fig.axes
    assert overprinted(fig) == []
    names, entries = [t.get_text() for t in ax.texts], legend_labels(ax)
    listed = dict(entry.split(": ", 1) for entry in entries if entry[0].isdigit())  # number -> "name (x, y)"
    assert listed and all(name in listed for name in names if name.isdigit()), (names, entries)
    assert "IDN n4 K2 repeat / Jacobi n4 K2 repeat" in names
    assert all(any(p.name in shown for shown in names + list(listed.values())) for p in points[1:]), (names, entries)
    assert ax.get_legend().get_window_extent().x0 > ax.get_window_extent().x1  # out of the axes, on the right
    check_style(fig)


# -- surrogate error -----------------------------------------------------------------------------------------------

def test_surrogate_errors_and_bars():
    system = residual_system(5, 3, seed=0, scales=[0.5, 0.6, 0.7, 0.8, 0.9])
    trace = system.sequential(random_state((3,), seed=0))
    strategies = {"Jacobi": ls.Zero(), "IDN": ls.Identity(), "Scaled": ls.Scaled()}
    errors = surrogate_errors(system, trace, strategies, layers=slice(1, 5), iters=30)
    assert list(errors) == list(strategies)
    for name, jacobian in strategies.items():
        assert torch.equal(errors[name], ls.surrogate_error(system, trace, jacobian, layers=slice(1, 5), iters=30))
    assert (errors["Scaled"] < errors["IDN"]).all()  # the exact skip path leaves only the small branch

    fig = plot_surrogate_error(errors, layer_offset=1, title="s")
    [ax] = fig.axes
    assert legend_labels(ax) == ["Jacobi", "IDN", "Scaled"] and len(ax.patches) == 3 * 4
    np.testing.assert_array_equal([t for t in ax.get_xticks()], [2, 3, 4, 5])  # layers 2..5, 1-based
    heights = [bar.get_height() for bar in ax.patches]
    np.testing.assert_allclose(heights, torch.cat(list(errors.values())).numpy(), rtol=0)
    centres = np.array([bar.get_x() + bar.get_width() / 2 for bar in ax.patches]).reshape(3, 4)
    np.testing.assert_allclose(centres.mean(axis=0), [2, 3, 4, 5])  # each group centred on its layer
    assert ax.get_xlabel() == "layer l" and "||J_l - J~_l||_2" in ax.get_ylabel()
    check_style(fig)
    relative = plot_surrogate_error({"IDN": errors["IDN"]}, relative=True).axes[0]
    assert relative.get_ylabel() == "||J_l - J~_l||_2 / ||J_l||_2" and relative.get_legend() is None
    with pytest.raises(ValueError, match=r"errors must all cover the same layers, got lengths \[3, 4\]"):
        plot_surrogate_error({"a": errors["IDN"], "b": errors["IDN"][:3]})


# -- training ------------------------------------------------------------------------------------------------------

def metrics(reg_scale, skipped=()):
    train = [{"step": s, "loss": 5.0 - s / 10 + reg_scale * 0.1, "ce": 5.0 - s / 10, "reg": reg_scale * 0.1,
              "skipped": s in skipped, "seconds": 0.5} for s in range(1, 11)]
    return {"train": train, "evals": [{"step": 5, "loss": 4.6, "ppl": math.exp(4.6), "bpb": 2.0},
                                      {"step": 10, "loss": 4.1, "ppl": math.exp(4.1), "bpb": 1.8}]}


def test_training_curves():
    c = training_curves(metrics(1.0, skipped=(3, 4)))
    np.testing.assert_array_equal(c.step, np.arange(1, 11))
    np.testing.assert_allclose(c.ce, 5.0 - np.arange(1, 11) / 10)
    np.testing.assert_allclose(c.loss - c.ce, 0.1)
    assert c.step.dtype == np.float64 and c.skipped.dtype == bool
    np.testing.assert_array_equal(np.flatnonzero(c.skipped), [2, 3])
    np.testing.assert_array_equal(c.eval_step, [5, 10])
    np.testing.assert_array_equal(c.eval_loss, [4.6, 4.1])
    old = training_curves({"train": [{"step": 1, "loss": 3.0, "ce": 3.0}]})  # no reg, no evals: an older log
    assert math.isnan(old.reg[0]) and not old.skipped[0] and len(old.eval_step) == 0


def test_plot_training():
    fig = plot_training({"baseline": metrics(0.0), "idn": metrics(1.0, skipped=(7,))}, title="runs")
    left, right = fig.axes
    assert legend_labels(left) == ["baseline: train", "baseline: validation", "idn: train", "idn: skipped steps",
                                   "idn: validation"]
    np.testing.assert_array_equal(left.get_lines()[3].get_xdata(), [7])  # the skipped step, marked
    assert legend_labels(right) == ["baseline", "idn"]
    np.testing.assert_allclose(right.get_lines()[1].get_ydata(), 0.1)
    assert left.get_xlabel() == right.get_xlabel() == "training step"
    assert left.get_ylabel() == "cross-entropy loss (nats per token)"
    check_style(fig)


# -- the update profile --------------------------------------------------------------------------------------------

def test_plot_update_profile_shades_the_segment():
    profile = [9.0, 0.5, 0.01, 0.02, 0.8]
    fig = plot_update_profile(profile, segment=(2, 4), title="p")
    [ax] = fig.axes
    bars = list(ax.containers[0])  # the bar chart's rectangles
    np.testing.assert_allclose([b.get_height() for b in bars], profile)
    np.testing.assert_allclose([b.get_x() + b.get_width() / 2 for b in bars], range(5))  # block i at x = i
    [span] = [p for p in ax.patches if p not in bars]
    xs = span.get_path().transformed(span.get_patch_transform()).vertices[:, 0]  # a Rectangle or a Polygon
    np.testing.assert_allclose([xs.min(), xs.max()], [1.5, 3.5])  # blocks 2 and 3, edge to edge
    assert legend_labels(ax) == ["parallel segment: blocks 2-3"] and ax.get_yscale() == "log"
    assert ax.get_xlabel() == "block (0-based)"
    check_style(fig)
    assert plot_update_profile(profile).axes[0].get_legend() is None
