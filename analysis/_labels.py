"""Names beside the points of a plot that do not overprint each other: each name takes the nearest free place
around its point (a leader line where it sits farther out), the most crowded points first; a name with no room
left goes by a number at its point, listed in the legend. Measured with the renderer, after the layout is final."""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Mapping, NamedTuple, Sequence

import numpy as np

from ._plot import SMALL

if TYPE_CHECKING:
    from matplotlib.path import Path
    from matplotlib.transforms import Bbox


def _renderer(fig):
    """One renderer to measure every text with, through the public Agg canvas (a bare Figure's own canvas has
    none, and drawing anew for each measurement makes the placing take seconds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    return fig.canvas.get_renderer()


# Where a name may go, in points from its point: up-right first (the old fixed offset), then the other sides, then
# the same farther out; beyond the first ring a thin leader line runs from the name to its point.
_RADII = (5, 10, 16, 24, 34, 46)
_SIDES = ((4, 3), (4, -3), (-4, 3), (-4, -3), (5, 0), (-5, 0), (0, 5), (0, -5))  # length 5: one radius
_HA = {1: "left", 0: "center", -1: "right"}  # the text on the side away from its point
_VA = {1: "bottom", 0: "center", -1: "top"}
_NEAR = 10.0  # points: the same name (one plan of two models) closer than this gets one label
_SAME = 1.0  # points: different names closer than this share one label, "a / b"
_GAP = (3.0, 1.0)  # points around a name, left and right, above and below; wide, as names side by side read as one


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


class _Place(NamedTuple):
    """Where a name may go: its offset from its point (points), its box with the gap around (pixels), the path of
    its leader line (None: none), and whether box and leader hide no marker but its point's."""
    offset: tuple[float, float]
    box: Bbox
    leader: Path | None
    clear: bool

    def clashes(self, other: _Place) -> bool:
        """Whether the two overlap, or a leader line crosses the other's box."""
        return _hits(self.box, self.leader, other.box) or _hits(other.box, other.leader, self.box)


def name_points(ax, named: Sequence[tuple[float, float, str]]) -> None:
    """Annotate each (x, y, name), in data coordinates, so that no two names overprint (_place_names). A name that
    finds no room goes by a number at its point instead, listed in the legend with its coordinates; the legend then
    moves out to the right of the axes, as it does where it would cover a name: the axes shrink, so every name is
    placed again, until each fits or is listed."""
    listed: dict[tuple[str, float, float], int] = {}  # (name, x, y) of a spot -> its number
    while named:  # ends: each further try lists one more spot, or has moved the legend out of the axes
        annotations, failed = _place_names(ax, named, listed)
        legend, renderer = ax.get_legend(), _renderer(ax.figure)
        covers = legend is not None and any(legend.get_window_extent(renderer).overlaps(a.get_window_extent(renderer))
                                            for a in annotations)
        if not failed and not covers:
            return
        for annotation in annotations:
            annotation.remove()
        for spot in failed:  # an entry without a handle
            listed[spot] = len(listed) + 1
            name, x, y = spot
            ax.plot([], [], linestyle="none", label=f"{listed[spot]}: {name} ({x:.2f}x, {y:.4g})")
        ax.legend(fontsize=SMALL, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)


def _place_names(ax, named, listed: Mapping[tuple[str, float, float], int]):
    """One try at name_points. Names of one spot are merged ("a / b"); a spot in `listed` goes by its number. Each
    spot may take any offset of _RADII x _SIDES that lies inside the axes. The numbers go first, then the spot with
    the fewest places left (the most crowded, before its neighbours take its room), each to its nearest clear place
    (_Place) if it has one, else its nearest; the places of the others that clash with it drop out. Returns the
    annotations, and the (name, x, y) of the spots that found no room."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.draw_without_rendering()  # layout, limits and scale final: pixel positions hold from here on
    renderer, pt = _renderer(fig), fig.dpi / 72.0  # and pixels per point
    spots = []  # (data xy, pixels, every member's pixels, names): the first member's point is the spot's
    for x, y, name in named:
        at = ax.transData.transform((x, y))
        for _, anchor, members, names in spots:
            apart = np.hypot(*(at - anchor)) / pt
            if apart <= _SAME or (name in names and apart <= _NEAR):
                members.append(at)
                names += [] if name in names else [name]
                break
        else:
            spots.append(((x, y), at, [at], [name]))
    markers = []  # every drawn point: the square around its marker (a point off a log axis has none)
    for coll in ax.collections:
        centres = coll.get_offset_transform().transform(np.ma.filled(np.ma.asarray(coll.get_offsets(), float), np.nan))
        for c, size in zip(centres, itertools.cycle(coll.get_sizes())):
            r = np.sqrt(size) / 2 * pt
            markers += [(c, Bbox.from_bounds(*(c - r), 2 * r, 2 * r))] if np.isfinite(c).all() else []
    notes = [t.get_window_extent(renderer) for t in ax.texts]  # a text already there: no name may touch it
    keys, texts, places = [], [], []
    for xy, anchor, members, names in spots:
        keys.append((" / ".join(names), *xy))
        texts.append(str(listed[keys[-1]]) if keys[-1] in listed else keys[-1][0])
        others = [box for c, box in markers if not any(np.allclose(c, m) for m in members)]
        places.append([place for place in _places(ax, renderer, texts[-1], xy, anchor, others, pt)
                       if not any(_hits(place.box, place.leader, note) for note in notes)])
    annotations, failed, left = [], [], list(range(len(spots)))
    while left:
        i = min(left, key=lambda k: (keys[k] not in listed, len(places[k])))
        left.remove(i)
        if not places[i]:
            failed += [] if keys[i] in listed else [keys[i]]  # a number with no room: its entry says where
            continue
        chosen = next((place for place in places[i] if place.clear), places[i][0])
        (dx, dy), leader = chosen.offset, chosen.leader
        arrow = None if leader is None else dict(arrowstyle="-", color="0.4", linewidth=0.6, shrinkA=0, shrinkB=2,
                                                 relpos=_facing(dx, dy))
        annotations.append(ax.annotate(texts[i], spots[i][0], xytext=(dx, dy), textcoords="offset points",
                                       fontsize=SMALL, ha=_HA[_sign(dx)], va=_VA[_sign(dy)], arrowprops=arrow))
        for k in left:
            places[k] = [place for place in places[k] if not place.clashes(chosen)]
    return annotations, failed


def _facing(dx: float, dy: float) -> tuple[float, float]:
    """Where on a name's box, offset by (dx, dy) from its point, the side facing the point is (box fractions)."""
    return (1 - _sign(dx)) / 2, (1 - _sign(dy)) / 2


def _hits(box, leader, other) -> bool:
    """Whether a name's box, or its leader line (None: none), touches box `other`."""
    return box.overlaps(other) or (leader is not None and leader.intersects_bbox(other, filled=False))


def _places(ax, renderer, text, xy, anchor, markers, pt) -> list[_Place]:
    """The places at which `text`, naming data point xy (pixels: anchor), lies inside the axes, nearest first;
    clear where the text and its leader hide none of `markers`."""
    from matplotlib.path import Path
    from matplotlib.transforms import Bbox

    frame = ax.get_window_extent(renderer)
    probe = ax.annotate(text, xy, xytext=(0, 0), textcoords="offset points", fontsize=SMALL)
    places = []
    for radius, (dx, dy) in itertools.product(_RADII, _SIDES):
        offset = (radius * dx / 5, radius * dy / 5)
        probe.xyann = offset
        probe.set(ha=_HA[_sign(dx)], va=_VA[_sign(dy)])
        text_box = probe.get_window_extent(renderer)
        x0, y0, x1, y1 = text_box.extents
        gap_x, gap_y = _GAP[0] * pt, _GAP[1] * pt  # the gap is between names; a marker may come closer
        box = Bbox.from_extents(x0 - gap_x, y0 - gap_y, x1 + gap_x, y1 + gap_y)
        leader = Path([box.p0 + box.size * _facing(dx, dy), anchor]) if radius > _RADII[0] else None
        if frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1:
            places.append(_Place(offset, box, leader, not any(_hits(text_box, leader, m) for m in markers)))
    probe.remove()
    return places
