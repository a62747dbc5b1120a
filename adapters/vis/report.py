"""The static report page (infer-eval-config.md §5): one HTML file showing the report PNGs.

Images are linked by relative path (the PNGs sit next to the page), so the page can be copied
with its folder; no script, no external resource. Every text value is HTML-escaped.
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from ports.rendering import ReportFigure, ReportPage

STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:1100px;color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}"
    "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}"
    "td.v{text-align:right;font-family:monospace}"
    "img{max-width:100%;border:1px solid #ddd}"
    ".note{color:#666}"
    ".summary{background:#fff4e0;border:1px solid #e0b060;padding:0.5em 1em}"
    ".thumbs{display:flex;flex-wrap:wrap;gap:12px}"
    ".thumbs figure{margin:0;width:260px}"
    ".thumbs img{width:256px}"
    ".thumbs figcaption{font-size:0.85em;color:#444}"
)


def _table(rows: Sequence[tuple[str, str]], header: tuple[str, str]) -> str:
    head = f"<tr><th>{html.escape(header[0])}</th><th>{html.escape(header[1])}</th></tr>"
    body = "".join(
        f'<tr><td>{html.escape(key)}</td><td class="v">{html.escape(value)}</td></tr>' for key, value in rows
    )
    return f"<table>{head}{body}</table>"


def _figure(figure: ReportFigure) -> str:
    parts = [f"<h2>{html.escape(figure.heading)}</h2>"]
    if figure.image is not None:
        src = html.escape(figure.image, quote=True)
        parts.append(
            f'<p><a href="{src}"><img src="{src}" alt="{html.escape(figure.heading, quote=True)}"></a></p>'
        )
    if figure.note:
        parts.append(f'<p class="note">{html.escape(figure.note)}</p>')
    return "\n".join(parts)


def _thumbnails(thumbnails: Sequence[tuple[str, str]]) -> str:
    items = []
    for image, caption in thumbnails:
        src = html.escape(image, quote=True)
        items.append(
            f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(caption, quote=True)}"></a>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return '<div class="thumbs">' + "".join(items) + "</div>"


def report_html(page: ReportPage) -> str:
    """The page: title, notes, key metrics, counters, then one section per figure."""
    title = html.escape(page.title)
    sections = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{title}</title><style>{STYLE}</style></head><body>",
        f"<h1>{title}</h1>",
    ]
    if page.summary:
        sections.append(f'<p class="summary">{html.escape(page.summary)}</p>')
    sections += [f'<p class="note">{html.escape(note)}</p>' for note in page.notes]
    if page.metrics:
        sections += ["<h2>Key metrics</h2>", _table(page.metrics, ("metric", "value"))]
    if page.counters:
        sections += ["<h2>Counters</h2>", _table(page.counters, ("counter", "value"))]
    if page.thumbnails:
        sections += [
            "<h2>Overlays</h2>",
            '<p class="note">Ground truth in green with its description above; predictions in red with '
            "their score. Click an image for full size.</p>",
            _thumbnails(page.thumbnails),
        ]
    sections += [_figure(f) for f in page.figures]
    sections.append("</body></html>")
    return "\n".join(sections) + "\n"


class HtmlReportRenderer:
    """:class:`ports.rendering.ReportRenderer` producing one static HTML page."""

    def report_html(self, page: ReportPage) -> str:
        return report_html(page)
