"""The visualization use case (infer-eval-config.md §5) and its entry point.

``python -m application.visualize --config FILE`` draws overlays from an existing
``gt_vs_pred.jsonl`` (no model is loaded or even named) and, when the evaluator's outputs exist,
an evaluation report. The inference pipeline's vis stage calls :func:`run_vis_stage` with the same
arguments.

Outputs in ``vis.output_dir``:
- ``vis_{index:06d}.png``: the first ``vis.limit`` records by ``index`` (null = all); a record whose
  image is missing or unreadable is skipped with one warning, so a gap in the numbering marks it;
- ``vis_summary.json``: ``{rendered, skipped_missing_image, ...}`` plus the image root and its source;
- with ``metrics.json`` in the eval directory: ``report.html`` showing ``report_pr_curves.png``
  (from the evaluator's ``pr_curves.json``), ``report_per_class_ap.png`` (from ``per_class.csv``),
  ``report_parse_drops.png`` (the artifact's ``errors`` codes) and the key metrics.

Files of an earlier run with these names are removed first, so a stale overlay never hides a skip.
Every file is written atomically through the :class:`ArtifactStore` (D16).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from application.config.resolved import RESOLVED_CONFIG_FILENAME, load_resolved_config
from application.dataset_images import resolve_image_path
from application.json_reading import as_float, json_array, json_object
from domain.errors import ArtifactError, ConfigError, ImageFileError
from domain.evaluation import (
    COCO_STAT_NAMES,
    EvalImage,
    PrecisionCurves,
    ScoreMode,
    assign_image_ids,
    f1ish_threshold_label,
    prepare_record,
    primary_f1ish_threshold,
)
from domain.lvis import FREQUENCY_NAMES, LVIS_FREQUENCIES, LVIS_STAT_NAMES
from domain.records import image_path_problem
from ports.json_types import JsonValue
from ports.rendering import (
    ImageRenderer,
    OverlayObject,
    OverlayRole,
    OverlayStyle,
    ReportFigure,
    ReportPage,
    ReportRenderer,
)
from ports.storage import ArtifactStore, ImageStore

POINTER_FILENAME = "resolved_config.path"  # §2.3: next to an artifact written outside run_dir
VIS_SUMMARY_FILENAME = "vis_summary.json"
REPORT_HTML = "report.html"
PR_CURVES_PNG = "report_pr_curves.png"
PER_CLASS_AP_PNG = "report_per_class_ap.png"
PARSE_DROPS_PNG = "report_parse_drops.png"
PER_FREQUENCY_AP_PNG = "report_per_frequency_ap.png"
OWN_FILES = re.compile(r"^(vis_\d{6}\.png|report\.html|report_[a-z_]+\.png|vis_summary\.json)$")

MAX_AP_BARS = 60  # beyond this many categories the chart shows the best and the worst halves

# The fine error codes of gt_vs_pred.jsonl (§3.2), in the spec's order; the chart lists each (zeros
# included) and appends any other code found in the artifact.
ERROR_CODES: tuple[str, ...] = (
    "other",
    "unexpected_keys",
    "missing_desc",
    "missing_geom",
    "order_violation",
    "non_coord_token",
    "wrong_arity",
    "incomplete_tail",
    "bbox_invalid",
    "degenerate",
    "truncated",
    "parse_failed",
    "empty_pred",
    "generation_failed",
)

Warn = Callable[[str], None]
DEFAULT_STYLE = OverlayStyle()  # §5 colours, line width 3, legend strip


def warn_runtime(message: str) -> None:
    """Default warning sink: a ``RuntimeWarning`` (diagnostics warn and continue, §2.9)."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Image root (§2.3, eval/vis side)
# --------------------------------------------------------------------------------------------


@attrs.frozen
class ImageRoot:
    """The base directory of relative ``image`` paths and how it was found.

    ``source``: ``config`` (``data.image_root``), ``producer`` (the producing run's
    ``resolved_config.json``) or ``artifact_dir``.
    """

    path: Path
    source: str


def _same_file(recorded: object, artifact: Path) -> bool:
    return isinstance(recorded, str) and bool(recorded) and Path(recorded).resolve() == artifact.resolve()


def producer_config_path(artifact: Path) -> Path | None:
    """The producing run's ``resolved_config.json``: the pointer file's target when the pointer exists,
    else ``<artifact dir>/resolved_config.json`` when that exists. Parent directories are never searched."""
    pointer = artifact.parent / POINTER_FILENAME
    if pointer.is_file():
        lines = pointer.read_text(encoding="utf-8").splitlines()
        target = lines[0].strip() if lines else ""
        if not target or not Path(target).is_absolute():
            raise ArtifactError(
                f"{pointer}: must hold the absolute path of a resolved_config.json, got {target!r}"
            )
        return Path(target)
    candidate = artifact.parent / RESOLVED_CONFIG_FILENAME
    return candidate if candidate.is_file() else None


def discover_image_root(artifact: Path, configured: Path | None, *, warn: Warn = warn_runtime) -> ImageRoot:
    """Eval/vis image root, first that applies (§2.3): (1) ``data.image_root``; (2) ``image_root`` of the
    producing run's ``resolved_config.json`` (via the pointer file, else next to the artifact), accepted
    only if its ``kind`` is ``infer_pipeline`` and its ``artifacts.gt_vs_pred_jsonl`` resolves to this
    artifact; (3) the artifact's directory. A candidate that is not accepted is named in one warning."""
    artifact = Path(artifact)
    if configured is not None:
        return ImageRoot(Path(configured).absolute(), "config")
    try:
        candidate = producer_config_path(artifact)
        if candidate is not None:
            document = load_resolved_config(candidate)
            artifacts = document["artifacts"]
            recorded = artifacts.get("gt_vs_pred_jsonl") if isinstance(artifacts, dict) else None
            root = document.get("image_root")
            if not _same_file(recorded, artifact):
                warn(
                    f"{candidate}: records the artifact {recorded!r}, not {artifact}; not used for the image root"
                )
            elif not isinstance(root, str) or not root:
                warn(f"{candidate}: has no image_root; not used for the image root")
            else:
                return ImageRoot(Path(root).absolute(), "producer")
    except ArtifactError as exc:
        warn(f"producer config not used for the image root: {exc}")
    return ImageRoot(artifact.parent.absolute(), "artifact_dir")


# --------------------------------------------------------------------------------------------
# Reading the artifact
# --------------------------------------------------------------------------------------------


@attrs.frozen
class VisRecord:
    """One artifact record to draw: its 1-based line, its ``index`` and the raw record."""

    line: int
    index: int
    record: Mapping[str, Any]


@attrs.frozen
class ArtifactContent:
    """The records in ``index`` order and the occurrences of every error code over all records."""

    records: tuple[VisRecord, ...]
    error_counts: tuple[tuple[str, int], ...]


def _error_codes(record: Mapping[str, Any], path: Path, line: int) -> list[str]:
    errors = record.get("errors", [])
    if not isinstance(errors, list) or not all(isinstance(code, str) for code in errors):
        raise ArtifactError(f"{path}:{line}: errors: must be a list of strings, got {errors!r}")
    return errors


def read_artifact(artifact: Path, store: ArtifactStore) -> ArtifactContent:
    """Strictly read ``gt_vs_pred.jsonl`` (a malformed line raises with ``path:line``); records are
    sorted by ``index`` (the 0-based ordinal when no record has one, §4.1)."""
    numbered = [(item.line, {k: v for k, v in item.record.items() if k != "raw_output"})
                for item in store.read_jsonl(artifact)]  # fmt: skip
    lines = [line for line, _ in numbered]
    ids = assign_image_ids([rec for _, rec in numbered], str(artifact), lines)
    counts = dict.fromkeys(ERROR_CODES, 0)
    for line, rec in numbered:
        for code in _error_codes(rec, artifact, line):
            counts[code] = counts.get(code, 0) + 1
    records = sorted(
        (VisRecord(line, index, rec) for (line, rec), index in zip(numbered, ids)), key=lambda r: r.index
    )
    return ArtifactContent(tuple(records), tuple(counts.items()))


def _raw_score(raw: object) -> float | None:
    value = raw.get("score") if isinstance(raw, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value) if 0.0 <= value <= 1.0 else None


def overlay_objects(image: EvalImage, scores: Sequence[float | None] | None = None) -> list[OverlayObject]:
    """GT then valid predictions of a validated record as overlay objects, in record order.

    ``scores`` (one per valid prediction) replaces the predictions' own ``score``; the vis stage
    passes the artifact's raw scores, the evaluator's overlays may pass nothing.
    """
    if scores is not None and len(scores) != len(image.preds):
        raise ValueError(f"{len(scores)} scores for {len(image.preds)} valid predictions")
    own = [o.score for o in image.preds]
    out = [OverlayObject(OverlayRole.GT, o.kind, o.points, o.desc) for o in image.gt]
    out += [
        OverlayObject(OverlayRole.PRED, o.kind, o.points, o.desc, score)
        for o, score in zip(image.preds, own if scores is None else scores, strict=True)
    ]
    return out


def raw_scores(image: EvalImage, raw_preds: Sequence[object]) -> list[float | None]:
    """The artifact's score of every valid prediction (None when absent or not a number in [0, 1])."""
    invalid = {p.index for p in image.invalid_preds}
    return [_raw_score(raw) for i, raw in enumerate(raw_preds) if i not in invalid]


def render_record_overlay(
    image: EvalImage,
    objects: Sequence[OverlayObject],
    image_root: Path,
    destination: Path,
    *,
    renderer: ImageRenderer,
    images: ImageStore,
    store: ArtifactStore,
    style: OverlayStyle = DEFAULT_STYLE,
    where: str = "",
    warn: Warn = warn_runtime,
) -> bool:
    """Draw one record's overlay into ``destination`` (PNG, atomic). Shared by the vis stage and the
    evaluator's overlays (§4.5). A missing or unreadable image gives one warning and False; a path
    that is absolute or escapes ``image_root`` raises :class:`ArtifactError` (data.md §1.2)."""
    problem = image_path_problem(image.file_name)
    if problem is not None:
        raise ArtifactError(f"{where or image.file_name}: image: {problem}")
    path = resolve_image_path(image.file_name, image_root)
    try:
        pixels = images.read_rgb(path)
    except ImageFileError as exc:
        warn(f"overlay for {where or image.file_name} skipped: {exc}")
        return False
    if tuple(pixels.size) != (image.width, image.height):
        warn(
            f"overlay for {where or image.file_name}: image {path} is {pixels.size[0]}x{pixels.size[1]}, "
            f"the record says {image.width}x{image.height}; drawn in the record's pixel space"
        )
    store.write_bytes(destination, renderer.overlay_png(pixels, objects, style))
    return True


def validated_record(item: VisRecord, artifact: Path) -> EvalImage:
    """The record checked like the evaluator does (§4.1): bad record fields or GT raise with
    ``path:line``; predictions that fail validation are kept aside (not drawn)."""
    return prepare_record(item.record, image_id=item.index, path=str(artifact), line=item.line,
                          score_mode=ScoreMode.CONSTANT)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Report (from the evaluator's outputs, §4.5)
# --------------------------------------------------------------------------------------------


def _fmt(value: object) -> str:
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value == -1.0:  # COCO's -1: nothing to measure (e.g. no small objects)
            return "undefined"
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def per_frequency_groups(metrics: Mapping[str, Any]) -> list[tuple[str, list[tuple[str, float]]]]:
    """``[("rare", [("bbox", APr), ("segm", APr)]), ...]`` from LVIS metrics; ``[]`` for a COCO evaluation."""
    groups = []
    for freq in LVIS_FREQUENCIES:
        rows = [(t, float(metrics[f"{t}_AP{freq}"])) for t in ("bbox", "segm") if f"{t}_AP{freq}" in metrics]
        if rows:
            groups.append((FREQUENCY_NAMES[freq], rows))
    return groups


def key_metrics(metrics: Mapping[str, Any], meta: Mapping[str, Any]) -> list[tuple[str, str]]:
    """COCO (or LVIS) stats (bbox, then segm) and, per F1-ish threshold (primary first), micro P/R/F1."""
    names = dict.fromkeys((*COCO_STAT_NAMES, *LVIS_STAT_NAMES))
    rows = [(f"{t}_{s}", _fmt(metrics[f"{t}_{s}"])) for t in ("bbox", "segm") for s in names
            if f"{t}_{s}" in metrics]  # fmt: skip
    thrs = [float(t) for t in meta.get("f1ish_iou_thrs") or []]
    if thrs:
        primary = primary_f1ish_threshold(thrs)
        for thr in [primary, *(t for t in thrs if t != primary)]:
            prefix = f"f1ish@{f1ish_threshold_label(thr)}_"
            for name in ("precision_loc_micro", "recall_loc_micro", "f1_loc_micro",
                         "precision_full_micro", "recall_full_micro", "f1_full_micro"):  # fmt: skip
                if prefix + name in metrics:
                    rows.append((prefix + name, _fmt(metrics[prefix + name])))
    rows += [(k, _fmt(v)) for k, v in metrics.items() if k.startswith("dup/raw/")]  # stage2.md §18.7
    return rows


def read_per_class_ap(path: Path, store: ArtifactStore) -> list[tuple[str, float]]:
    """``per_class.csv`` (header ``category,AP``; ``nan`` for categories without GT)."""
    text = "\n".join(line.text for line in store.read_lines(path))
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or rows[0] != ["category", "AP"]:
        raise ArtifactError(f"{path}:1: expected the header 'category,AP', got {rows[0] if rows else None!r}")
    out: list[tuple[str, float]] = []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        try:
            if len(row) != 2:
                raise ValueError(f"{len(row)} fields")
            out.append((row[0], float(row[1])))
        except ValueError as exc:
            raise ArtifactError(f"{path}:{number}: expected 'category,AP', got {row!r} ({exc})") from None
    return out


def ap_bars(rows: Sequence[tuple[str, float]]) -> tuple[list[tuple[str, float]], str]:
    """The bars to draw (defined APs; the best and worst halves beyond MAX_AP_BARS) and a note."""
    defined = [(name, ap) for name, ap in rows if not math.isnan(ap)]
    notes = []
    undefined = len(rows) - len(defined)
    if undefined:
        notes.append(f"{undefined} categories without ground truth (AP undefined) are not shown.")
    if len(defined) <= MAX_AP_BARS:
        return defined, " ".join(notes)
    ranked = sorted(defined, key=lambda r: -r[1])
    half = MAX_AP_BARS // 2
    notes.append(f"{len(defined)} categories: the {half} best and the {half} worst by AP are shown.")
    return ranked[:half] + ranked[-half:], " ".join(notes)


def read_pr_curves(path: Path, store: ArtifactStore) -> PrecisionCurves:
    """The evaluator's ``pr_curves.json`` (``recall_thresholds`` and named ``curves``)."""
    data = store.read_json(path)
    try:
        document = json_object(data)
        recall = tuple(as_float(v) for v in json_array(document["recall_thresholds"]))
        curves = tuple(
            (k, tuple(as_float(v) for v in json_array(values)))
            for k, values in json_object(document["curves"]).items()
        )
    except (TypeError, KeyError, ValueError, AttributeError) as exc:
        raise ArtifactError(
            f"{path}: expected {{recall_thresholds: [...], curves: {{name: [...]}}}}: {exc!r}"
        ) from None
    return PrecisionCurves(recall, curves)


def _curve_labels(metrics: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, str]:
    def with_ap(text: str, key: str) -> str:
        value = metrics.get(key)
        return f"{text} (AP {value:.3f})" if isinstance(value, (int, float)) and value >= 0 else text

    iou_thrs = meta.get("iou_thrs")
    span = "0.50:0.95" if not iou_thrs else f"{min(iou_thrs):.2f}:{max(iou_thrs):.2f}"
    return {
        "0.50": with_ap("IoU 0.50", "bbox_AP50"),
        "0.75": with_ap("IoU 0.75", "bbox_AP75"),
        "mean": with_ap(f"mean over IoU {span}", "bbox_AP"),
    }


def write_report(
    eval_dir: Path,
    output_dir: Path,
    error_counts: Sequence[tuple[str, int]],
    *,
    renderer: ImageRenderer,
    report_renderer: ReportRenderer,
    store: ArtifactStore,
    thumbnails: Sequence[tuple[str, str]] = (),
    summary: str | None = None,
) -> Path:
    """Plots and ``report.html`` in ``output_dir`` from the evaluator's outputs in ``eval_dir``; the
    ``thumbnails`` (overlay PNGs in ``output_dir`` with captions) are shown as a grid, ``summary`` first."""
    document = store.read_json(eval_dir / "metrics.json")
    metrics = document.get("metrics") if isinstance(document, dict) else None
    if not isinstance(document, dict) or not isinstance(metrics, dict):
        raise ArtifactError(
            f"{eval_dir / 'metrics.json'}: expected an object with 'metrics', 'counters', 'meta'"
        )
    raw_counters, raw_meta = document.get("counters"), document.get("meta")
    counters: dict[str, JsonValue] = raw_counters if isinstance(raw_counters, dict) else {}
    meta: dict[str, JsonValue] = raw_meta if isinstance(raw_meta, dict) else {}
    figures: list[ReportFigure] = []

    curves_file = eval_dir / "pr_curves.json"
    if curves_file.is_file():
        curves = read_pr_curves(curves_file, store)
        png = renderer.pr_curves_png(
            curves, _curve_labels(metrics, meta), "Precision-recall (bbox, area all, maxDets 100)"
        )
        store.write_bytes(output_dir / PR_CURVES_PNG, png)
        figures.append(ReportFigure("Precision-recall curves", PR_CURVES_PNG,
                                    "Class-averaged precision at COCO's 101 recall thresholds; gaps are undefined."))  # fmt: skip
    else:
        figures.append(
            ReportFigure("Precision-recall curves", None, f"not available: {curves_file} does not exist")
        )

    per_class_file = eval_dir / "per_class.csv"
    if per_class_file.is_file():
        bars, note = ap_bars(read_per_class_ap(per_class_file, store))
        store.write_bytes(
            output_dir / PER_CLASS_AP_PNG, renderer.per_class_ap_png(bars, "Per-class AP (bbox)")
        )
        figures.append(ReportFigure("Per-class AP", PER_CLASS_AP_PNG, note))
    else:
        figures.append(ReportFigure("Per-class AP", None, f"not available: {per_class_file} does not exist"))

    frequency_groups = per_frequency_groups(metrics)
    if frequency_groups:  # eval.dataset_style: lvis
        store.write_bytes(
            output_dir / PER_FREQUENCY_AP_PNG,
            renderer.frequency_ap_png(frequency_groups, "LVIS AP per category frequency"),
        )
        note = "APr / APc / APf: categories in < 10, 10-99, >= 100 training images."
        figures.append(ReportFigure("AP per category frequency (LVIS)", PER_FREQUENCY_AP_PNG, note))

    store.write_bytes(
        output_dir / PARSE_DROPS_PNG, renderer.drop_counts_png(error_counts, "Parse drops and record codes")
    )
    figures.append(ReportFigure("Parse drops by reason", PARSE_DROPS_PNG,
                                "Occurrences of each error code over all records of gt_vs_pred.jsonl."))  # fmt: skip

    notes = [f"Evaluator outputs: {eval_dir.absolute()}"]
    notes += [
        f"{k}: {_fmt(meta[k])}" for k in ("coco_backend", "gt_source", "score_mode", "images") if k in meta
    ]
    page = ReportPage(
        title="CoordExp evaluation report",
        figures=tuple(figures),
        metrics=tuple(key_metrics(metrics, meta)),
        counters=tuple((str(k), _fmt(v)) for k, v in counters.items()),
        notes=tuple(notes),
        thumbnails=tuple(thumbnails),
        summary=summary,
    )
    path = output_dir / REPORT_HTML
    store.write_text(path, report_renderer.report_html(page))
    return path


# --------------------------------------------------------------------------------------------
# The use case
# --------------------------------------------------------------------------------------------


@attrs.frozen
class VisSummary:
    """What a vis run did; ``to_json`` is the content of ``vis_summary.json``."""

    rendered: int
    skipped_missing_image: int
    pred_objects_not_drawn: int
    records_total: int
    limit: int | None
    image_root: ImageRoot
    report: Path | None
    report_skipped_reason: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "rendered": self.rendered,
            "skipped_missing_image": self.skipped_missing_image,
            "pred_objects_not_drawn": self.pred_objects_not_drawn,
            "records_total": self.records_total,
            "limit": self.limit,
            "image_root": str(self.image_root.path),
            "image_root_source": self.image_root.source,
            "report": self.report.name if self.report is not None else None,
            "report_skipped_reason": self.report_skipped_reason,
        }


def overlay_file_name(index: int) -> str:
    return f"vis_{index:06d}.png"


def overlay_caption(item: VisRecord, gt: int, preds: int) -> str:
    """``index 0 · img_1.jpg · 3 GT, 3 predictions`` plus the record's error codes, if any."""
    codes = item.record.get("errors") or []
    name = Path(str(item.record.get("image", ""))).name
    text = f"index {item.index} · {name} · {gt} GT, {preds} predictions"
    return text + (f" · {', '.join(sorted(set(codes)))}" if codes else "")


def empty_reason(content: ArtifactContent) -> str | None:
    """Why the report is empty, e.g. ``0 predictions on 3 images: 3 parse_failed, 3 truncated``; None when
    there are predictions."""
    from application.headline import empty_result_reason
    from domain.inference import OBJECT_CODES, PRED_OBJECTS_DROPPED, PRED_OBJECTS_VALID

    counts = dict(content.error_counts)
    counts[PRED_OBJECTS_VALID] = sum(len(r.record.get("pred") or []) for r in content.records)
    counts[PRED_OBJECTS_DROPPED] = sum(counts.get(code, 0) for code in OBJECT_CODES)
    return empty_result_reason(counts, len(content.records))


def _remove_own_files(output_dir: Path) -> None:
    if output_dir.is_dir():
        for entry in output_dir.iterdir():
            if OWN_FILES.match(entry.name) and entry.is_file():
                entry.unlink()


def run_vis_stage(
    artifact: Path,
    output_dir: Path,
    *,
    limit: int | None,
    image_root: Path | None,
    eval_dir: Path | None,
    renderer: ImageRenderer,
    report_renderer: ReportRenderer,
    images: ImageStore,
    store: ArtifactStore,
    style: OverlayStyle = DEFAULT_STYLE,
    warn: Warn = warn_runtime,
) -> VisSummary:
    """The vis stage (§5) on an existing artifact; never loads a model.

    Arguments are plain values and ports: ``artifact`` = ``infer.gt_vs_pred_jsonl``; ``output_dir`` =
    ``vis.output_dir`` (derived ``<run_dir>/vis``); ``limit`` = ``vis.limit`` (None = all);
    ``image_root`` = ``data.image_root`` as configured (None -> discovered, §2.3); ``eval_dir`` = the
    evaluator's output directory (None or no ``metrics.json`` there -> no report).

    Raises :class:`ArtifactError` for a missing or malformed artifact and a rejected image path
    (absolute or escaping the root); a missing or unreadable image is one warning and a count.
    """
    artifact = Path(artifact)
    output_dir = Path(output_dir)
    if not artifact.is_file():
        raise ArtifactError(
            f"gt_vs_pred.jsonl not found at {artifact}; enable stages.infer or point "
            "infer.gt_vs_pred_jsonl at an existing artifact"
        )
    root = discover_image_root(artifact, image_root, warn=warn)
    content = read_artifact(artifact, store)
    selected = content.records if limit is None else content.records[:limit]

    _remove_own_files(output_dir)
    rendered = skipped = not_drawn = 0
    thumbnails: list[tuple[str, str]] = []
    for item in selected:
        image = validated_record(item, artifact)
        objects = overlay_objects(image, raw_scores(image, item.record["pred"]))
        drawn = render_record_overlay(
            image, objects, root.path, output_dir / overlay_file_name(item.index),
            renderer=renderer, images=images, store=store, style=style,
            where=f"record index {item.index} ({artifact}:{item.line})", warn=warn,
        )  # fmt: skip
        if drawn:
            rendered += 1
            not_drawn += len(image.invalid_preds)
            thumbnails.append((overlay_file_name(item.index), overlay_caption(item, len(image.gt), len(image.preds))))
        else:
            skipped += 1

    report: Path | None = None
    reason: str | None = None
    if eval_dir is None:
        reason = "no evaluation directory configured"
    elif not (Path(eval_dir) / "metrics.json").is_file():
        reason = f"no metrics.json in {eval_dir}"
    else:
        report = write_report(Path(eval_dir), output_dir, content.error_counts,
                              renderer=renderer, report_renderer=report_renderer, store=store,
                              thumbnails=thumbnails, summary=empty_reason(content))  # fmt: skip

    summary = VisSummary(
        rendered=rendered,
        skipped_missing_image=skipped,
        pred_objects_not_drawn=not_drawn,
        records_total=len(content.records),
        limit=limit,
        image_root=root,
        report=report,
        report_skipped_reason=reason,
    )
    store.write_json(output_dir / VIS_SUMMARY_FILENAME, summary.to_json())
    return summary


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


@attrs.frozen
class VisPaths:
    artifact: Path
    output_dir: Path
    eval_dir: Path | None


def resolve_vis_paths(config: Any) -> VisPaths:
    """``infer.gt_vs_pred_jsonl`` / ``vis.output_dir`` / ``eval.output_dir``, each defaulting under
    ``run_dir = run.output_dir / run.name`` (§2.3); without a run the eval directory is None."""
    run = config.run
    run_dir: Path | None = (
        Path(run.output_dir) / run.name if run is not None and run.name and run.output_dir else None
    )

    def pick(value: Path | None, default: str, key: str) -> Path:
        if value is not None:
            return Path(value)
        if run_dir is None:
            raise ConfigError(
                f"set '{key}', or 'run.output_dir' and 'run.name' to derive <run_dir>/{default}"
            )
        return run_dir / default

    artifact = pick(config.infer.gt_vs_pred_jsonl, "gt_vs_pred.jsonl", "infer.gt_vs_pred_jsonl")
    output_dir = pick(config.vis.output_dir, "vis", "vis.output_dir")
    eval_dir = (
        Path(config.eval.output_dir)
        if config.eval.output_dir is not None
        else (run_dir / "eval" if run_dir is not None else None)
    )
    return VisPaths(artifact, output_dir, eval_dir)


PROG = "application.visualize"


def main(argv: Sequence[str] | None = None) -> int:
    from application.cli import run_entry_point

    return run_entry_point(argv, PROG, _visualize_main)


def _visualize_main(config_path: Path) -> int:
    from application import wiring
    from application.config import check_local_paths, load_config

    config = load_config(config_path, entry_point="visualize").config
    check_local_paths(config, "visualize")
    if config.data.image_root is not None and not Path(config.data.image_root).is_dir():
        raise ConfigError(
            f"'data.image_root' must be an existing local directory: {config.data.image_root} not found"
        )
    paths = resolve_vis_paths(config)
    from application.run_lock import hold_run_directory

    with hold_run_directory(config, PROG, fallback=paths.output_dir):
        summary = run_vis_stage(
            paths.artifact,
            paths.output_dir,
            limit=config.vis.limit,
            image_root=config.data.image_root,
            eval_dir=paths.eval_dir,
            renderer=wiring.make_image_renderer(),
            report_renderer=wiring.make_report_renderer(),
            images=wiring.make_image_store(),
            store=wiring.make_artifact_store(),
        )
    print(
        json.dumps({"output_dir": str(paths.output_dir.absolute()), **summary.to_json()}, ensure_ascii=False)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
