"""Atomic writes for checkpoints and results: write to a temporary file beside the target, then rename, so an
interrupted run never leaves a half-written file behind (the old file stays until the new one is complete).
A leaf module: every part of `models` may import it."""

from __future__ import annotations

import json
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
    """Write obj as indented JSON, atomically."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=True) + "\n"
    return write_atomic(path, lambda f: f.write(text.encode()))


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Save a matplotlib figure atomically (format from the suffix, png by default) and close it (a pyplot
    figure's window and memory; a bare Figure has none)."""
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        return write_atomic(path, lambda f: fig.savefig(f, format=path.suffix[1:] or "png", dpi=dpi))
    finally:
        plt.close(fig)
