"""Atomic writes for checkpoints and results: write to a temporary file beside the target, then rename, so an
interrupted run never leaves a half-written file behind (the old file stays until the new one is complete).
A leaf module: every part of `models` may import it."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, IO


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call write(file) on a temporary file in path's directory, fsync it, and rename it to path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a result file should get the usual permissions
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write obj as indented JSON, atomically. JSON has no NaN or infinity: a non-finite float is written as null
    (a bare NaN is what Python's json would write, and no strict parser reads it)."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, allow_nan=False) + "\n"
    return write_atomic(path, lambda f: f.write(text.encode()))


def _finite(obj):
    """obj with every non-finite float, at any depth of dicts, lists and tuples, replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (format from the suffix, png by default) and close it (a pyplot
    figure's window and memory; a bare Figure has none)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        return write_atomic(path, lambda f: fig.savefig(f, format=path.suffix[1:] or "png", dpi=dpi))
    finally:
        plt.close(fig)
