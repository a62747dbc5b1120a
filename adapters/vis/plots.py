"""Report plots with matplotlib's Agg canvas (infer-eval-config.md §5).

Figures are built with ``matplotlib.figure.Figure`` on an explicit ``FigureCanvasAgg``: no pyplot,
no global figure registry, no interactive backend, whatever ``MPLBACKEND`` says. Every function
returns PNG bytes; writing them is the caller's (atomic) business.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from domain.evaluation import PrecisionCurves

DPI = 100
BAR_COLOR = "#1f77b4"
DROP_COLOR = "#ff7f0e"
ROW_INCHES = 0.24  # height per bar in the horizontal bar charts


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def _defined(values: Sequence[float]) -> list[float]:
    """COCO's -1 (no data at this recall) becomes NaN, which matplotlib leaves as a gap."""
    return [float(v) if v >= 0 else math.nan for v in values]


def pr_curves_png(curves: PrecisionCurves, labels: Mapping[str, str], title: str) -> bytes:
    """Precision (class-averaged) against the recall thresholds, one line per named curve."""
    figure = Figure(figsize=(6.4, 4.8), layout="constrained")
    axes = figure.add_subplot()
    recall = list(curves.recall_thresholds)
    drawn = 0
    styles = ("-", "--", "-.", ":")  # coinciding curves (e.g. both at precision 1) stay distinguishable
    for name, values in curves.curves:
        if len(values) != len(recall):
            raise ValueError(f"curve {name!r} has {len(values)} values for {len(recall)} recall thresholds")
        style = styles[drawn % len(styles)]
        axes.plot(recall, _defined(values), label=labels.get(name, name), linewidth=2, linestyle=style)
        drawn += 1
    if not drawn:
        axes.text(0.5, 0.5, "no precision data", ha="center", va="center", transform=axes.transAxes)
    axes.set_xlim(0.0, 1.0)
    axes.set_ylim(0.0, 1.02)
    axes.set_xlabel("recall")
    axes.set_ylabel("precision")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    if drawn:
        axes.legend(loc="lower left")
    return _png(figure)


def _bar_figure(n: int) -> Figure:
    return Figure(figsize=(7.0, max(2.5, 1.2 + ROW_INCHES * n)), layout="constrained")


def per_class_ap_png(rows: Sequence[tuple[str, float]], title: str) -> bytes:
    """Horizontal AP bars, first row on top, values written at the bar ends."""
    figure = _bar_figure(len(rows))
    axes = figure.add_subplot()
    names = [name for name, _ in rows]
    values = [float(v) for _, v in rows]
    positions = list(range(len(rows)))
    axes.barh(positions, values, color=BAR_COLOR)
    for y, v in zip(positions, values):
        axes.text(min(v, 1.0) + 0.01, y, f"{v:.3f}", va="center", fontsize=8)
    axes.set_yticks(positions, labels=names, fontsize=8)
    if rows:
        axes.set_ylim(len(rows) - 0.5, -0.5)  # first row on top, no empty bands
    axes.set_xlim(0.0, 1.12)
    axes.set_xlabel("AP (IoU 0.50:0.95, area all, maxDets 100)")
    axes.set_title(title)
    if not rows:
        axes.text(
            0.5, 0.5, "no category with a defined AP", ha="center", va="center", transform=axes.transAxes
        )
    return _png(figure)


def drop_counts_png(counts: Sequence[tuple[str, int]], title: str) -> bytes:
    """Horizontal count bars per reason code, first row on top, counts written at the bar ends."""
    figure = _bar_figure(len(counts))
    axes = figure.add_subplot()
    names = [name for name, _ in counts]
    values = [int(v) for _, v in counts]
    positions = list(range(len(counts)))
    axes.barh(positions, values, color=DROP_COLOR)
    top = max(values, default=0)
    span = top * 1.15 if top > 0 else 1.0
    for y, v in zip(positions, values):
        axes.text(v + span * 0.01, y, str(v), va="center", fontsize=8)
    axes.set_yticks(positions, labels=names, fontsize=8)
    if counts:
        axes.set_ylim(len(counts) - 0.5, -0.5)  # first row on top, no empty bands
    axes.set_xlim(0.0, span)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("occurrences")
    axes.set_title(title)
    if top == 0:
        axes.text(0.5, 0.5, "no drops", ha="center", va="center", transform=axes.transAxes)
    return _png(figure)


SERIES_COLORS = ("#1f77b4", "#2ca02c", "#9467bd")


def frequency_ap_png(groups: Sequence[tuple[str, Sequence[tuple[str, float]]]], title: str) -> bytes:
    """LVIS AP per frequency group (rare / common / frequent), one bar per series (bbox, segm) in each
    group, values written above the bars; LVIS's -1 (no category in the group) is written ``n/a``."""
    figure = Figure(figsize=(6.4, 4.0), layout="constrained")
    axes = figure.add_subplot()
    series = list(dict.fromkeys(name for _, rows in groups for name, _ in rows))
    width = 0.8 / max(1, len(series))
    for s_index, name in enumerate(series):
        xs, heights = [], []
        for g_index, (_, rows) in enumerate(groups):
            value = dict(rows).get(name)
            if value is None:
                continue
            x = g_index - 0.4 + width * (s_index + 0.5)
            defined = float(value) >= 0
            xs.append(x)
            heights.append(float(value) if defined else 0.0)
            axes.text(x, (float(value) if defined else 0.0) + 0.01, f"{value:.3f}" if defined else "n/a",
                      ha="center", va="bottom", fontsize=8)  # fmt: skip
        axes.bar(xs, heights, width=width, label=name, color=SERIES_COLORS[s_index % len(SERIES_COLORS)])
    axes.set_xticks(list(range(len(groups))), labels=[label for label, _ in groups])
    axes.set_ylim(0.0, 1.1)
    axes.set_ylabel("AP (IoU 0.50:0.95, 300 detections per image)")
    axes.set_title(title)
    if series:
        axes.legend(loc="upper left")
    else:
        axes.text(0.5, 0.5, "no LVIS metrics", ha="center", va="center", transform=axes.transAxes)
    return _png(figure)
