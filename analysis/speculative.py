"""Self-speculative decoding against the draft length B: from the rows `snlp bench` and
`benchmarks/speculative.py` write (one per plan, temperature and B, with sequential decoding's rows, draft_len
None, as the reference), a series per drafting plan and temperature, and a figure of acceptance and speedup.

Acceptance falls with B (a round stops at the first rejection, and later drafts are conditioned on more drafted
tokens) while the tokens per round grow; the speedup is the balance of the two against the draft's cost, so the
two panels are read together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from ._plot import FONT, figure, style


@dataclass(frozen=True)
class SpeculationSeries:
    """One drafting plan at one temperature (and group: a model, a shape; "" when the rows name none), by
    increasing draft length: acceptance rate, tokens committed per round, speedup over sequential decoding."""

    plan: str
    temperature: float
    group: str
    draft_lens: tuple[int, ...]
    acceptance_rate: tuple[float, ...]
    mean_accepted_length: tuple[float, ...]
    speedup: tuple[float, ...]

    @property
    def label(self) -> str:
        return f"{self.group + ': ' if self.group else ''}{self.plan}, T={self.temperature:g}"


def speculation_series(rows: Iterable[Mapping]) -> list[SpeculationSeries]:
    """A series per (group, plan, temperature), in the rows' order; the sequential rows (draft_len None) are the
    reference of the speedups and make no series. A draft length twice in one series is refused: the rows would
    mix two runs."""
    points: dict[tuple, dict[int, Mapping]] = {}
    for row in rows:
        if row["draft_len"] is None:
            continue
        key = (row.get("group", ""), row["plan"], float(row["temperature"]))
        if row["draft_len"] in points.setdefault(key, {}):
            raise ValueError(f"rows: two rows of {key} at draft_len {row['draft_len']}; give each run a 'group'")
        points[key][row["draft_len"]] = row
    series = []
    for (group, plan, temperature), by_len in points.items():
        ordered = [by_len[b] for b in sorted(by_len)]
        series.append(SpeculationSeries(plan, temperature, group, tuple(sorted(by_len)),
                                        tuple(r["acceptance_rate"] for r in ordered),
                                        tuple(r["mean_accepted_length"] for r in ordered),
                                        tuple(r["speedup"] for r in ordered)))
    return series


def plot_speculation(rows: Iterable[Mapping], title: str = ""):
    """Two panels against the draft length B (log2 axis): the acceptance rate, and the speedup over the fastest
    sequential decoding with its 1.0x line; one line per plan x temperature (dashed when sampling), the same colour
    in both panels, named once in the speedup panel's legend."""
    series = speculation_series(rows)
    if not series:
        raise ValueError("rows: no speculative rows (every row has draft_len None)")
    fig, (accept, speed) = figure(ncols=2)
    speed.axhline(1.0, color="grey", linestyle=":", label="fastest sequential (1.0x)")
    for i, s in enumerate(series):
        line = dict(color=f"C{i}", marker="o", linestyle="-" if s.temperature == 0 else "--")
        accept.plot(s.draft_lens, s.acceptance_rate, **line)
        speed.plot(s.draft_lens, s.speedup, label=s.label, **line)
    for ax in (accept, speed):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({b for s in series for b in s.draft_lens}))
        ax.get_xaxis().set_major_formatter("{x:g}")
    accept.set_ylim(0, 1.05)
    style(accept, "draft length B (tokens)", "acceptance rate (accepted / drafted)", "acceptance")
    style(speed, "draft length B (tokens)", "speedup over the fastest sequential decoding (x)", "speedup")
    if title:
        fig.suptitle(title, fontsize=FONT)
    return fig
