"""Renderers for use-case tests (no Pillow, no matplotlib): the "PNG" bytes name what would be drawn, so a
test reads back which objects an overlay held or which figures a report had."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import attrs

from domain.evaluation import PrecisionCurves
from ports.rendering import OverlayObject, OverlayStyle, ReportPage
from ports.storage import RGBImage

FAKE_PNG_PREFIX = b"FAKEPNG "


def _png(kind: str, content: object) -> bytes:
    return FAKE_PNG_PREFIX + json.dumps({"kind": kind, "content": content}, sort_keys=True).encode("utf-8")


def read_fake_png(data: bytes) -> dict[str, object]:
    """``{"kind": ..., "content": ...}`` of bytes written by :class:`FakeImageRenderer`."""
    if not data.startswith(FAKE_PNG_PREFIX):
        raise ValueError("not a fake PNG written by FakeImageRenderer")
    value: dict[str, object] = json.loads(data[len(FAKE_PNG_PREFIX):])
    return value


@attrs.define
class FakeImageRenderer:
    """:class:`ports.rendering.ImageRenderer`; ``calls`` lists the method names in call order."""

    calls: list[str] = attrs.field(factory=list)

    def overlay_png(self, image: RGBImage, objects: Sequence[OverlayObject], style: OverlayStyle) -> bytes:
        self.calls.append("overlay_png")
        drawn = [{"role": o.role.value, "kind": o.kind.value, "points": list(o.points), "label": o.label}
                 for o in objects]  # fmt: skip
        return _png("overlay", {"size": list(image.size), "objects": drawn})

    def pr_curves_png(self, curves: PrecisionCurves, labels: Mapping[str, str], title: str) -> bytes:
        self.calls.append("pr_curves_png")
        return _png("pr_curves", {"title": title, "labels": dict(labels)})

    def per_class_ap_png(self, rows: Sequence[tuple[str, float]], title: str) -> bytes:
        self.calls.append("per_class_ap_png")
        return _png("per_class_ap", {"title": title, "rows": [[name, ap] for name, ap in rows]})

    def drop_counts_png(self, counts: Sequence[tuple[str, int]], title: str) -> bytes:
        self.calls.append("drop_counts_png")
        return _png("drop_counts", {"title": title, "counts": [[code, n] for code, n in counts]})

    def frequency_ap_png(self, groups: Sequence[tuple[str, Sequence[tuple[str, float]]]], title: str) -> bytes:
        self.calls.append("frequency_ap_png")
        return _png("frequency_ap", {"title": title, "groups": [name for name, _ in groups]})


@attrs.define
class FakeReportRenderer:
    """:class:`ports.rendering.ReportRenderer`: a minimal page listing the figures and metrics; ``pages`` keeps
    every page it was given."""

    pages: list[ReportPage] = attrs.field(factory=list)

    def report_html(self, page: ReportPage) -> str:
        self.pages.append(page)
        figures = "".join(f"<h2>{f.heading}</h2><p>{f.image or f.note}</p>" for f in page.figures)
        metrics = "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in page.metrics)
        return f"<html><h1>{page.title}</h1>{figures}<table>{metrics}</table></html>\n"
