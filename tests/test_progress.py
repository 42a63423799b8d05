"""Progress output: a plain line every few items where stderr is not a terminal, never a redrawn bar."""

import io

from models.progress import Lines, progress


def test_a_log_gets_one_line_every_few_items_and_one_at_the_end():
    log = io.StringIO()
    with progress(range(23), total=23, desc="train", unit="step", every=5, file=log) as bar:
        assert isinstance(bar, Lines)
        for i in bar:
            bar.set_postfix(loss=f"{1 / (i + 1):.2f}")
    lines = log.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"train: {n}/23 step" for n in (5, 10, 15, 20, 23)]
    assert lines[-1].endswith("loss=0.04") and "\r" not in log.getvalue()


def test_updates_by_amount_and_a_resumed_start():
    log = io.StringIO()
    bar = progress(total=1000, desc="tokenizing", unit="B", file=log, unit_scale=True)
    for _ in range(4):
        bar.update(250)
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == [
        f"tokenizing: {n}/1000 B" for n in (250, 500, 750, 1000)]
    log = io.StringIO()
    for _ in progress(range(8, 10), total=10, initial=8, desc="train", unit="step", file=log):
        pass
    assert [line.split(",")[0] for line in log.getvalue().splitlines()] == ["train: 9/10 step", "train: 10/10 step"]


def test_disabled_prints_nothing():
    log = io.StringIO()
    assert list(progress(range(3), total=3, desc="x", disable=True, file=log)) == [0, 1, 2]
    assert log.getvalue() == ""


def test_row_15_a_resumed_run_shows_the_rate_of_the_steps_done_now(monkeypatch):
    """Issue 26, row 15: resumed at step 90 of 100, 10 steps in 1 s is 10 step/s, not 100."""
    clock = iter([0.0, 1.0])
    monkeypatch.setattr("models.progress.time.perf_counter", lambda: next(clock))
    log = io.StringIO()
    bar = Lines(None, 100, "train", "step", 90, 10, log)
    bar.update(10)
    assert log.getvalue() == "train: 100/100 step, 10 step/s\n"
