"""Point labels of the Pareto plot, placed so that none overlaps another label, a point or the front line.

Placement works in display points (1/72 inch) after the figure's layout has settled; a label block is
tried right of its point, then shifted up/down, then left of it with a leader line.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

from matplotlib.backends.backend_agg import FigureCanvasAgg


@dataclass
class Note:
    """One point's label: a bold title above the point and, unless empty, a coloured line below it."""

    x: float
    y: float
    title: str  # bit widths, shared by the points of one size
    line: str  # method and value, drawn in the method's colour ("" for the float star)
    colour: str


LINE_PT = 8.5  # label line height in points (fontsize 7)
CHAR_PT = 4.1  # average character width at fontsize 7, in points (bold titles are a little wider)


def _blocks(notes: list[Note], per_pt: float) -> list[list[Note]]:
    """Points of one size (one x) whose labels would touch share one label block, highest point first."""
    by_x: dict[float, list[Note]] = {}
    for n in notes:
        by_x.setdefault(round(n.x, 6), []).append(n)
    blocks: list[list[Note]] = []
    for group in by_x.values():
        group.sort(key=lambda n: -n.y)
        current: list[Note] = []
        for n in group:
            if current:
                reach = (sum(bool(m.line) for m in current) + 1) * LINE_PT * per_pt
                if n.y >= current[0].y - reach:
                    current.append(n)
                    continue
                blocks.append(current)
            current = [n]
        blocks.append(current)
    return blocks


def _overlaps(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _block_rects(
    x0: float, top: float, title: str, width: float, height: float, has_lines: bool
) -> list[tuple[float, float, float, float]]:
    """The title's and the lines' boxes (display points); the 5 pt gap between them is where the point is."""
    rects = [(x0, top - LINE_PT, x0 + CHAR_PT * (len(title) + 1), top)]
    if has_lines:
        rects.append((x0, top - height, x0 + width, top - LINE_PT - 5))
    return rects


def place_labels(ax, notes: list[Note], front: list[tuple[float, float]]) -> None:
    """Label the points so that no two labels overlap, and no label covers a point or the front line.

    A block is a bold title (the bit widths) above the point and one line per point below it, in the
    point's colour, with its method and value. Blocks go right of their point when there is room, else they
    are moved up/down or to the left (with a thin leader line), found greedily in display points.
    ``front``: the vertices of the Pareto staircase, whose segments are obstacles too.
    """
    fig = ax.get_figure()
    FigureCanvasAgg(fig).draw()  # settle the layout: data -> display points is exact from here on
    scale = 72.0 / fig.dpi
    box = ax.bbox
    ax_left, ax_bottom, ax_right, ax_top = (v * scale for v in (box.x0, box.y0, box.x1, box.y1))
    axis_h = box.height * scale
    lo, hi = ax.get_ylim()
    per_pt = (hi - lo) / axis_h

    def to_pt(x: float, y: float) -> tuple[float, float]:
        px, py = ax.transData.transform((x, y))
        return px * scale, py * scale

    taken = [(px - 5, py - 5, px + 5, py + 5) for px, py in (to_pt(n.x, n.y) for n in notes)]
    for (x1, y1), (x2, y2) in pairwise(front):  # "post" steps: along at y1, then up/down at x2
        (a, b), (c, d) = to_pt(x1, y1), to_pt(x2, y2)
        taken += [(a, b - 1.5, c, b + 1.5), (c - 1.5, min(b, d), c + 1.5, max(b, d))]
    lowest = lo
    shifts = [0, -1, 1, -2, 2, -3, 3, -4, 4, -6, 6, -8, 8]
    for block in sorted(_blocks(notes, per_pt), key=lambda b: (b[0].x, -b[0].y)):
        head = block[0]
        title = "/".join(dict.fromkeys(n.title for n in block))
        lines = [n for n in block if n.line]
        hx, hy = to_pt(head.x, head.y)
        width = CHAR_PT * max([len(title) + 1, *(len(n.line) for n in lines)])
        height = LINE_PT + 5 + len(lines) * LINE_PT  # title above the point, a 5 pt gap, the lines below
        choice = None
        for strict in (True, False):  # first inside the axes; then overflowing at the bottom (room is made)
            for k in shifts:
                for side in (1, -1):
                    x0 = hx + 6 if side > 0 else hx - 6 - width
                    top = hy + 2 + LINE_PT + k * LINE_PT
                    rects = _block_rects(x0, top, title, width, height, bool(lines))
                    inside = x0 >= ax_left and x0 + width <= ax_right and top <= ax_top
                    low_ok = top - height >= ax_bottom or not strict
                    if inside and low_ok and not any(_overlaps(r, t) for r in rects for t in taken):
                        choice = (x0, top, k, side)
                        break
                if choice:
                    break
            if choice:
                break
        x0, top, k, side = choice or (hx + 6, hy + 2 + LINE_PT, 0, 1)
        taken += _block_rects(x0, top, title, width, height, bool(lines))
        if (
            top - height < ax_bottom
        ):  # the y limit that keeps this block inside: (y - lo') / (hi - lo') = d / H
            depth = hy - (top - height) + 4
            lowest = min(lowest, (head.y * axis_h - depth * hi) / (axis_h - depth))
        dx, dtop = x0 - hx, top - hy
        if k != 0 or side < 0:  # moved away from its point: a leader line says which point it belongs to
            ax.annotate("", (head.x, head.y), xytext=(dx + (0 if side > 0 else width), dtop - LINE_PT - 2),
                        textcoords="offset points", zorder=4,
                        arrowprops={"arrowstyle": "-", "color": "gray", "linewidth": 0.6})  # fmt: skip
        ax.annotate(title, (head.x, head.y), xytext=(dx, dtop - LINE_PT), textcoords="offset points",
                    fontsize=7, fontweight="bold", va="bottom", ha="left", zorder=5)  # fmt: skip
        for i, n in enumerate(lines):
            ax.annotate(n.line, (head.x, head.y), xytext=(dx, dtop - LINE_PT - 5 - i * LINE_PT),
                        textcoords="offset points", fontsize=7, color=n.colour, va="top", ha="left",
                        zorder=5)  # fmt: skip
    if lowest < lo:  # lower the axis so that the labels of the lowest points fit
        ax.set_ylim(lowest, hi)
