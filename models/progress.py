"""Progress output that suits where it goes: a redrawn tqdm bar on a terminal, and in a log file or CI (stderr is
not a terminal) one plain line every `every` items and at the end, because a redrawn bar written to a file is one
ever-growing line of carriage returns. A leaf module: every part of `models` may import it."""

from __future__ import annotations

import sys
import time
from typing import IO, Iterable, Iterator

from tqdm import tqdm


class Lines:
    """tqdm's small surface used here (iteration, `update`, `set_postfix`, a context manager), printing a line
    `desc: done/total unit (rate) postfix` every `every` items and once at the end."""

    def __init__(self, iterable: Iterable | None, total: int, desc: str, unit: str, initial: int, every: int,
                 file: IO[str]):
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.done, self.initial, self.every, self.file = initial, initial, max(1, every), file
        self.postfix, self.start, self.last_line = "", time.perf_counter(), initial

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self.done // self.every > before // self.every or self.done >= self.total:
            self._line()

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def _line(self) -> None:
        if self.done == self.last_line:
            return
        self.last_line = self.done
        seconds = time.perf_counter() - self.start
        rate = f", {(self.done - self.initial) / seconds:.3g} {self.unit}/s" if seconds > 0 else ""  # done here
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}{rate}{postfix}", file=self.file, flush=True)

    def __enter__(self) -> "Lines":
        return self

    def __exit__(self, *exc) -> None:
        return None


def progress(iterable: Iterable | None = None, *, total: int, desc: str, unit: str = "it", initial: int = 0,
             every: int | None = None, disable: bool = False, file: IO[str] | None = None, **bar_options):
    """A progress reporter over `iterable` (or driven by `update(n)`): tqdm on a terminal, `Lines` otherwise
    (every: items per line, default a tenth of the total). `bar_options` go to tqdm only (unit_scale, delay)."""
    file = file or sys.stderr
    if disable or file.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=file,
                    dynamic_ncols=True, **bar_options)
    return Lines(iterable, total, desc, unit, initial, every or max(1, (total - initial) // 10), file)
