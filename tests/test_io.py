"""models.io: atomic writes of results, checkpoints and figures."""

import json
import os

import pytest

from models.io import save_figure, write_atomic, write_json


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


def test_save_figure_writes_png_by_suffix(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    save_figure(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert not plt.fignum_exists(fig.number)  # closed after saving


def test_write_json_writes_strict_json(tmp_path):
    """Row 16 of issue 26: a bare NaN (Python's json default) is not JSON; every result goes through write_json."""
    path = write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("inf"), (float("-inf"), 2)]})

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    assert json.loads(path.read_text(), parse_constant=refuse) == {"a": None, "b": [1.0, None, [None, 2]]}
