"""A run directory's housekeeping: a new run starts in an empty directory (or, asked to, replaces the run there);
old checkpoints are rotated out; the temporaries of a write that a SIGKILL interrupted are removed on resume.

What a run writes there: model_<step>.pt, meta_<step>.json, optim_<step>_rank<r>.pt, metrics.json and tokenizer/;
`snlp eval` and `snlp study` add eval.json and study/. Every file goes through `models.io.write_atomic`, whose
temporaries are hidden files `.<name>.<random>.tmp` beside the target.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ..nanochat import checkpoint as nanochat_checkpoint
from .checkpoint import optimizer_path

RUN_FILES = re.compile(r"(model|optim|meta)_\d+.*\.(pt|json)|metrics\.json|eval\.json|tokenizer|study")
TEMPORARY = re.compile(r"\..+\.tmp")


def start(directory: Path, resume: bool, overwrite: bool, rank: int = 0) -> None:
    """Before a run writes anything: a run resumed keeps its directory, less stale temporaries; a new run needs
    an empty (or absent) directory, unless `overwrite`, which removes what an earlier run wrote there (rank 0
    only: the other ranks of a data-parallel run skip the check, which rank 0 makes for them)."""
    if resume:
        if rank == 0:
            remove_temporaries(directory)
        return
    if not directory.exists():
        return
    if not directory.is_dir():
        raise ValueError(f"out_dir {directory} is a file, not a directory")
    if overwrite:
        if rank == 0:
            for path in directory.iterdir():
                if RUN_FILES.fullmatch(path.name) or TEMPORARY.fullmatch(path.name):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    held = sorted(p.name for p in directory.iterdir())
    if held:
        shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
        raise ValueError(f"out_dir {directory} is not empty (it holds {shown}): resume its run with --resume, "
                         "replace it with --overwrite, or train into another --out")


def remove_temporaries(directory: Path) -> list[str]:
    """Delete the temporaries of interrupted atomic writes in `directory` (no write is in flight: the run has not
    started); return their names."""
    stale = [p for p in directory.glob(".*.tmp") if TEMPORARY.fullmatch(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return sorted(p.name for p in stale)


def rotate(directory: Path, keep: int, rank: int) -> None:
    """Keep the newest `keep` checkpoints (the latest, just written, among them): each rank removes its own
    optimizer files of older steps, rank 0 their weights and meta (the weights first: a checkpoint without its
    model file is no checkpoint)."""
    own = re.compile(rf"optim_(\d+)_rank{rank}\.pt")
    for step in sorted(int(m.group(1)) for p in directory.iterdir() if (m := own.fullmatch(p.name)))[:-keep]:
        optimizer_path(directory, step, rank).unlink(missing_ok=True)
    if rank == 0:
        for step in nanochat_checkpoint.steps(directory)[:-keep]:
            for path in nanochat_checkpoint.paths(directory, step):
                path.unlink(missing_ok=True)
