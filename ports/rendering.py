"""Ports of visualization (infer-eval-config.md §5): overlay drawing, report plots and the report page.

Renderers turn values into file contents (PNG bytes, HTML text); writing them (atomically, D16) is
the job of :class:`ports.storage.ArtifactStore`, and decoding the source image the job of
:class:`ports.storage.ImageStore`. ``adapters.vis`` implements these protocols with PIL and
matplotlib.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Protocol

import attrs

from domain.evaluation import PrecisionCurves
from domain.objects import GeometryKind
from ports.storage import RGBImage

GT_COLOR = "#2ca02c"  # §5: ground truth, desc above
PRED_COLOR = "#d62728"  # §5: predictions, desc and score below
LINE_WIDTH = 3  # §5


class OverlayRole(str, enum.Enum):
    """Whose object is drawn: ground truth or a prediction (decides colour and label placement)."""

    GT = "gt"
    PRED = "pred"


def _points(values: Sequence[int]) -> tuple[int, ...]:
    return tuple(int(v) for v in values)


@attrs.frozen
class OverlayObject:
    """One object to draw, in the pixel space of the image as stored.

    ``points``: ``[x1, y1, x2, y2]`` (inclusive pixel corners) for a bbox, a flat ring of at least
    3 vertices for a polygon (first vertex not repeated). ``score`` is None for ground truth and for
    unscored predictions.
    """

    role: OverlayRole
    kind: GeometryKind
    points: tuple[int, ...] = attrs.field(converter=_points)
    desc: str
    score: float | None = None

    @property
    def label(self) -> str:
        """GT: the desc; prediction: the desc and the score with two decimals when scored."""
        if self.role is OverlayRole.PRED and self.score is not None:
            return f"{self.desc} {self.score:.2f}" if self.desc else f"{self.score:.2f}"
        return self.desc


@attrs.frozen
class OverlayStyle:
    """Colours and stroke of an overlay (§5 values by default); ``legend`` adds a key strip below the image."""

    gt_color: str = GT_COLOR
    pred_color: str = PRED_COLOR
    line_width: int = LINE_WIDTH
    legend: bool = True

    def color_of(self, role: OverlayRole) -> str:
        return self.gt_color if role is OverlayRole.GT else self.pred_color


class ImageRenderer(Protocol):
    """Draws overlays and the report's plots; every method returns PNG file bytes."""

    def overlay_png(self, image: RGBImage, objects: Sequence[OverlayObject], style: OverlayStyle) -> bytes:
        """Draw ``objects`` (GT first, then predictions, each in input order) on a transparent layer
        of the image's own size, alpha-composite it over ``image`` as stored (never resized) and
        encode RGB PNG. With ``style.legend`` a key strip is appended below the image; the image's
        pixels keep their coordinates. Geometry outside the image is clipped by the drawing."""
        ...

    def pr_curves_png(self, curves: PrecisionCurves, labels: Mapping[str, str], title: str) -> bytes:
        """Precision against the recall thresholds, one line per curve of ``curves`` (``labels`` maps a
        curve name such as ``"0.50"`` to its legend text); values below 0 (undefined) are gaps."""
        ...

    def per_class_ap_png(self, rows: Sequence[tuple[str, float]], title: str) -> bytes:
        """Horizontal bars of AP in [0, 1] per category name, in the given order (NaN rows left out
        by the caller)."""
        ...

    def drop_counts_png(self, counts: Sequence[tuple[str, int]], title: str) -> bytes:
        """Horizontal bars of counts per reason code, in the given order (zeros drawn as empty bars)."""
        ...

    def frequency_ap_png(
        self, groups: Sequence[tuple[str, Sequence[tuple[str, float]]]], title: str
    ) -> bytes:
        """LVIS AP per frequency group: one cluster per group (``"rare"``, ...), one bar per series
        (``"bbox"``, ``"segm"``) inside it; a value below 0 (group without categories) is marked n/a."""
        ...


@attrs.frozen
class ReportFigure:
    """One section of the report page: a heading, the PNG file (relative to the page) or None, a note."""

    heading: str
    image: str | None
    note: str = ""


@attrs.frozen
class ReportPage:
    """The evaluation report page: figures, a key-metrics table and a counters table."""

    title: str
    figures: tuple[ReportFigure, ...]
    metrics: tuple[tuple[str, str], ...]
    counters: tuple[tuple[str, str], ...]
    notes: tuple[str, ...] = ()
    #: overlay thumbnails shown as a grid: (PNG file next to the page, caption)
    thumbnails: tuple[tuple[str, str], ...] = ()
    #: a sentence shown first when something needs explaining (e.g. why there are no predictions)
    summary: str | None = None


class ReportRenderer(Protocol):
    """Renders the static report page (a small self-contained HTML file linking PNGs by relative path)."""

    def report_html(self, page: ReportPage) -> str:
        """The page's HTML text; every text value is escaped."""
        ...
