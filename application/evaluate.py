"""The detection evaluator use case (infer-eval-config.md §4) and its entry point.

``python -m application.evaluate --config FILE`` evaluates ``infer.gt_vs_pred_jsonl`` (or, with
``eval.coco_results_json``, a COCO results file against ``eval.coco_gt_json``) and replaces
``eval.output_dir`` with a fresh directory of outputs (§4.5).

The use case receives its ports (``ArtifactStore``, ``CocoEvaluator``, ``LvisEvaluator``, the
``SemanticStep``, the overlay renderer and ``ImageStore``) as arguments, bundled in
:class:`EvaluateDependencies`; only the entry point (:func:`default_dependencies`, called from ``main``)
asks :mod:`application.wiring` for them.
"""

from __future__ import annotations

import contextlib
import csv
import gc
import io
import json
import math
import multiprocessing
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import msgspec
import numpy as np
import numpy.typing as npt

from application.config.schema import EvalConfig
from application.lvis_eval import (
    PER_FREQUENCY_JSON,
    lvis_evaluations,
    lvis_setting_problems,
    per_frequency_document,
    require_lvis,
)
from domain.duplicates import (
    DEFAULT_DUPLICATE_IOU_THRESHOLD,
    DuplicateStats,
    DuplicateSummary,
    duplicate_desc_key,
    duplicate_stats,
    objects_in_bins_batch,
    summarize_duplicate_stats,
)
from domain.errors import ArtifactError, ConfigError, ImageFileError
from domain.evaluation import (
    Category,
    CategoryTable,
    CocoEvaluation,
    DescMapping,
    EvalImage,
    EvalObject,
    EvalSummary,
    F1ishImage,
    MappingRule,
    PredScope,
    ScoreMode,
    Similarity,
    assign_image_ids,
    box_iou_matrix,
    canonical_coco_gt,
    canonical_coco_id,
    categories_from_gt,
    check_coco_iou_thrs,
    check_f1ish_iou_thrs,
    coco_prediction,
    count_images,
    empty_counters,
    f1ish_image,
    f1ish_scope_mask,
    f1ish_summary,
    f1ish_undefined_problem,
    has_polygon_segmentation,
    is_image_info,
    join_official_images,
    match_row,
    matches_file_name,
    needs_mask_iou,
    normalize_desc,
    parse_artifact_line,
    per_image_entry,
    prepare_record,
    primary_f1ish_threshold,
    rebuilt_coco_gt,
    semantic_report,
)
from domain.geometry import box_iou
from domain.lvis import LvisEvaluation
from domain.objects import DetObject, GeometryKind
from domain.records import image_path_problem
from ports.evaluation import CocoEvaluator, LvisEvaluator, SemanticStep, TextEncoder
from ports.rendering import ImageRenderer, OverlayObject, OverlayRole, OverlayStyle
from ports.storage import ArtifactStore, ImageStore

PREPARE_CHUNK = 256
OVERLAY_DIR = "overlays"
Warn = Callable[[str], None]


def warn_runtime(message: str) -> None:
    """Diagnostics warn and continue (overlays are diagnostics, §2.3)."""
    warnings.warn(message, RuntimeWarning, stacklevel=3)


@attrs.frozen
class OverlaySetup:
    """What ``eval.overlay`` needs: the shared renderer (§5), an image reader, ``data.image_root``."""

    renderer: ImageRenderer
    images: ImageStore
    image_root: Path | None = None
    style: OverlayStyle = attrs.field(factory=OverlayStyle)


# --------------------------------------------------------------------------------------------
# Semantic step (§4.2): one encoder, one normalisation, one threshold for COCO mapping and F1-ish
# --------------------------------------------------------------------------------------------


class EmbeddingSimilarity:
    """Cosine similarity over unit-norm embeddings, each string encoded once per run."""

    def __init__(self, encoder: TextEncoder) -> None:
        self._encoder = encoder
        self._cache: dict[str, npt.NDArray[np.float32]] = {}

    def prime(self, texts: Sequence[str]) -> None:
        """Encode every not-yet-seen string in one batch."""
        missing = sorted({t for t in texts if t not in self._cache})
        if not missing:
            return
        vectors = self._encoder.encode(missing)
        if vectors.shape[0] != len(missing):
            raise ArtifactError(
                f"text encoder returned {vectors.shape[0]} embeddings for {len(missing)} texts"
            )
        for text, vec in zip(missing, vectors):
            self._cache[text] = np.asarray(vec, dtype=np.float32)

    def __call__(self, query: str, candidates: Sequence[str]) -> list[float]:
        self.prime([query, *candidates])
        matrix = np.stack([self._cache[c] for c in candidates]) if candidates else np.zeros((0, 1))
        return [float(v) for v in matrix.astype(np.float64) @ self._cache[query].astype(np.float64)]


# --------------------------------------------------------------------------------------------
# Settings checks (config errors, before anything is read or written)
# --------------------------------------------------------------------------------------------


def check_settings(settings: EvalConfig) -> None:
    """Cross-field rules of §4.3/§4.4/§4.6 the evaluator relies on; raises :class:`ConfigError`."""
    problems = check_coco_iou_thrs(settings.iou_thrs) + check_f1ish_iou_thrs(settings.f1ish_iou_thrs)
    if settings.coco_results_json is not None and settings.coco_gt_json is None:
        problems.append("'eval.coco_gt_json' is required with 'eval.coco_results_json'")
    problems += lvis_setting_problems(settings)
    for key, path in (
        ("eval.coco_gt_json", settings.coco_gt_json),
        ("eval.coco_results_json", settings.coco_results_json),
    ):
        if path is not None and not Path(path).is_file():
            problems.append(f"'{key}' names a file that does not exist: {path}")
    sem = settings.semantic
    if sem.enabled and sem.model_path is not None and not Path(sem.model_path).is_dir():
        problems.append(
            f"'eval.semantic.model_path' must be an existing local directory, got {str(sem.model_path)!r}"
        )
    if problems:
        raise ConfigError(problems)


# --------------------------------------------------------------------------------------------
# Reading the artifact (§4.1)
# --------------------------------------------------------------------------------------------


def read_artifact_records(path: Path) -> tuple[list[dict[str, Any]], list[int]]:
    """Strictly read ``gt_vs_pred.jsonl``: the records and their 1-based physical line numbers."""
    records: list[dict[str, Any]] = []
    lines: list[int] = []
    try:
        with open(path, encoding="utf-8") as handle:
            texts = handle.readlines()
    except OSError as exc:
        raise ArtifactError(f"cannot read the artifact {path}: {exc}") from exc
    for number, text in enumerate(texts, start=1):
        record = _object_fast(text)
        if record is None:  # blank, malformed, not an object, or beyond msgspec: the strict reader decides
            record = parse_artifact_line(text, str(path), number)
        if record is not None:
            records.append(record)
            lines.append(number)
    return records, lines


_DECODER = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()


def _object_fast(text: str) -> dict[str, Any] | None:
    """A well-formed JSON object line decoded by msgspec (about 1.5x ``json.loads``), else None.

    msgspec is as strict as the reader it speeds up (no NaN / Infinity, no trailing data); anything it
    refuses goes through :func:`parse_artifact_line`, which accepts or raises exactly as before."""
    try:
        value = _DECODER.decode(text)
    except (msgspec.DecodeError, ValueError, OverflowError):
        return None
    return value if isinstance(value, dict) else None


def _prepare_chunk(
    chunk: Sequence[tuple[dict[str, Any], int, int]], path: str, score_mode: ScoreMode
) -> list[EvalImage]:
    return [
        prepare_record(rec, image_id=iid, path=path, line=ln, score_mode=score_mode) for rec, iid, ln in chunk
    ]


def prepare_images(path: Path, score_mode: ScoreMode, num_workers: int) -> list[EvalImage]:
    """Every record as a validated :class:`EvalImage`, sorted by image_id (workers change nothing)."""
    records, lines = read_artifact_records(path)
    ids = assign_image_ids(records, str(path), lines)
    items = list(zip(records, ids, lines))
    chunks = [items[i : i + PREPARE_CHUNK] for i in range(0, len(items), PREPARE_CHUNK)]
    images: list[EvalImage] = []
    if num_workers > 0 and len(chunks) > 1:
        # spawn, not fork: the pipeline may run this after torch started its threads
        with ProcessPoolExecutor(
            max_workers=num_workers, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            for part in pool.map(
                _prepare_chunk, chunks, [str(path)] * len(chunks), [score_mode] * len(chunks)
            ):
                images.extend(part)
    else:
        for chunk in chunks:
            images.extend(_prepare_chunk(chunk, str(path), score_mode))
    return sorted(images, key=lambda im: im.image_id)


# --------------------------------------------------------------------------------------------
# Outputs (§4.5): a fresh sibling directory swapped in as a whole
# --------------------------------------------------------------------------------------------


def json_text(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def json_compact(value: Any) -> str:
    """Large documents (COCO ground truth / results, per-image rows): one line, msgspec-encoded (about 6x
    ``json.dumps`` on the 5,000-image benchmark; ``indent`` would force Python's slow pure encoder).

    Their numbers are finite by construction (validated scores, integer geometry, parsed JSON refuses
    NaN); unlike ``json.dumps(allow_nan=False)`` msgspec would write a NaN as ``null`` rather than raise.
    What msgspec cannot encode (ints beyond 64 bits, lone surrogates) falls back to ``json.dumps``."""
    try:
        return _ENCODER.encode(value).decode("utf-8") + "\n"
    except (TypeError, OverflowError, UnicodeError, ValueError):  # e.g. ints beyond 64 bits, lone surrogates
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":")) + "\n"


def jsonl_text(rows: Sequence[Any]) -> str:
    try:
        return "".join(_ENCODER.encode(r).decode("utf-8") + "\n" for r in rows)
    except (TypeError, OverflowError, UnicodeError, ValueError):
        pass
    return "".join(
        json.dumps(r, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n" for r in rows
    )


def per_class_csv(evaluation: CocoEvaluation | LvisEvaluation, table: CategoryTable) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["category", "AP"])
    for cat_id, ap in sorted(evaluation.per_class_ap):
        writer.writerow([table.name_of(cat_id), "nan" if math.isnan(ap) else repr(float(ap))])
    return buffer.getvalue()


def _write_bytes(store: ArtifactStore, path: Path, data: bytes) -> None:
    # the one durable writer: a full disk is reported with the file's path, no partial file stays
    store.write_bytes(path, data)


def _write_file(store: ArtifactStore, path: Path, text: str) -> None:
    _write_bytes(store, path, text.encode("utf-8"))


@contextlib.contextmanager
def staged_directory(output_dir: Path, store: ArtifactStore) -> Iterator[Path]:
    """A fresh sibling temp directory that replaces ``output_dir`` as a whole on success (§4.5).

    Nothing from an earlier evaluation survives; on an exception the staging directory is removed
    and ``output_dir`` is left as it was.
    """
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = store.make_staging_directory(
        output_dir.parent, prefix=f".{output_dir.name}.tmp-"
    )
    try:
        yield staging
        retired = output_dir.parent / f".{output_dir.name}.old-{uuid.uuid4().hex}"
        if output_dir.exists():
            os.replace(output_dir, retired)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def write_best_effort(store: ArtifactStore, path: Path, text: str) -> bool:
    """Write a diagnostic file; False (never an exception) when that fails."""
    try:
        _write_file(store, path, text)
    except (OSError, UnicodeError):
        return False
    return True


# --------------------------------------------------------------------------------------------
# The use case
# --------------------------------------------------------------------------------------------


@attrs.frozen
class _CocoPart:
    metrics: dict[str, float]
    evaluations: tuple[CocoEvaluation | LvisEvaluation, ...]
    table: CategoryTable
    gt_document: dict[str, Any] | None
    predictions: list[dict[str, Any]]
    mapping_counts: dict[str, int]
    report: dict[str, Any] | None


def _semantic_meta(settings: EvalConfig, step: SemanticStep) -> dict[str, Any]:
    sem = settings.semantic
    meta: dict[str, Any] = {
        "enabled": step.encoder is not None,
        "model_path": str(sem.model_path) if sem.model_path is not None else None,
        "threshold": sem.threshold,
    }
    if step.encoder is None:
        meta["disabled_reason"] = step.disabled_reason or "disabled"
    return meta


def _meta(
    settings: EvalConfig, backend: str, gt_source: str, step: SemanticStep, images: int
) -> dict[str, Any]:
    return {
        "coco_backend": backend,
        "dataset_style": settings.dataset_style,
        **({"lvis_backend": settings.lvis_backend} if settings.dataset_style == "lvis" else {}),
        "score_mode": settings.score_mode,
        "gt_source": gt_source,
        "semantic": _semantic_meta(settings, step),
        "iou_thrs": list(settings.iou_thrs) if settings.iou_thrs is not None else None,
        "f1ish_iou_thrs": list(settings.f1ish_iou_thrs),
        "f1ish_pred_scope": settings.f1ish_pred_scope,
        "images": images,
    }


def _run_coco(
    images: Sequence[EvalImage],
    settings: EvalConfig,
    coco: CocoEvaluator,
    similarity: Similarity | None,
    official_gt: dict[str, Any] | None,
    artifact: Path,
    lvis: LvisEvaluator | None = None,
    *,
    score: bool = True,
) -> _CocoPart:
    """COCO mapping, the ``coco_preds.json`` export and (``score=True``) the COCO / LVIS evaluation;
    ``score=False`` (an image-info ground truth, no annotations) maps and exports only."""
    if official_gt is not None:
        table = CategoryTable([_category(c) for c in official_gt["categories"]])
        joined = join_official_images(
            images, official_gt, artifact=str(artifact), gt_source=str(settings.coco_gt_json)
        )
        with_segm = settings.use_segm and has_polygon_segmentation(official_gt)
        gt_document: dict[str, Any] = official_gt
    else:
        table = CategoryTable(categories_from_gt(images))
        joined = {}
        with_segm = settings.use_segm and any(o.kind is GeometryKind.POLY for im in images for o in im.gt)
        gt_document = rebuilt_coco_gt(images, table, with_segmentation=with_segm)

    if similarity is not None and isinstance(similarity, EmbeddingSimilarity):
        similarity.prime(
            [normalize_desc(c.name) for c in table.categories]
            + [normalize_desc(p.desc) for im in images for p in im.preds]
        )
    mappings: dict[str, DescMapping] = {}
    counts: dict[str, int] = {}
    mapping_counts = {rule.value: 0 for rule in MappingRule}
    per_image_preds: list[tuple[int, list[dict[str, Any]]]] = []
    for image in images:
        official = joined.get(image.image_id)
        coco_id = int(official["id"]) if official is not None else image.image_id
        scale = (
            (float(official["width"]) / image.width, float(official["height"]) / image.height)
            if official is not None
            else None
        )
        rows: list[dict[str, Any]] = []
        for pred in image.preds:
            desc = pred.desc
            mapping = mappings.get(desc)
            if mapping is None:
                mapping = mappings[desc] = table.map_desc(desc, similarity, settings.semantic.threshold)
            counts[desc] = counts.get(desc, 0) + 1
            if mapping.category_id is None:
                continue
            rows.append(
                coco_prediction(
                    pred, coco_image_id=coco_id, category_id=mapping.category_id,
                    with_segmentation=with_segm, scale=scale,
                )
            )  # fmt: skip
        per_image_preds.append((coco_id, rows))
    predictions = [row for _, rows in sorted(per_image_preds, key=lambda item: item[0]) for row in rows]
    for desc, n in counts.items():  # every prediction counted once, under its desc's rule
        mapping_counts[mappings[desc].rule.value] += n

    img_ids = sorted(int(o["id"]) for o in joined.values()) if official_gt is not None else None
    evaluations: list[CocoEvaluation | LvisEvaluation] = []
    if not score:
        pass  # nothing to score against: the export alone
    elif lvis is not None:  # eval.dataset_style: lvis (federated AP from the LVIS evaluator)
        evaluations += lvis_evaluations(
            lvis, gt_document, predictions, with_segm=with_segm, iou_thrs=settings.iou_thrs, img_ids=img_ids
        )
    else:
        evaluations.append(
            coco.evaluate(gt_document, predictions, "bbox", iou_thrs=settings.iou_thrs, img_ids=img_ids)
        )
    if score and with_segm and lvis is None:
        evaluations.append(
            coco.evaluate(gt_document, predictions, "segm", iou_thrs=settings.iou_thrs, img_ids=img_ids)
        )
    metrics: dict[str, float] = {}
    for evaluation in evaluations:
        metrics.update(evaluation.metrics())

    report = None
    if similarity is not None and any(m.semantic_ran for m in mappings.values()):
        report = semantic_report(
            mappings, counts, table,
            model_path=str(settings.semantic.model_path), threshold=settings.semantic.threshold,
            unmapped_total_preds=mapping_counts[MappingRule.UNMAPPED.value],
        )  # fmt: skip
    return _CocoPart(
        metrics=metrics,
        evaluations=tuple(evaluations),
        table=table,
        gt_document=gt_document if official_gt is None else None,
        predictions=predictions,
        mapping_counts=mapping_counts,
        report=report,
    )


def _category(raw: Mapping[str, Any]) -> Category:
    synonyms = raw.get("synonyms")
    names = tuple(str(x) for x in synonyms) if isinstance(synonyms, list) else ()
    return Category(int(raw["id"]), str(raw["name"]), names)


def image_iou_matrix(image: EvalImage, coco: CocoEvaluator | None) -> npt.NDArray[np.float64]:
    """IoU ``[pred, gt]`` of one image: box IoU for box pairs, the library's mask IoU when a polygon
    is involved (§4.4). Exceptions propagate: an IoU failure is never a 0."""
    iou = box_iou_matrix(image.preds, image.gt)
    if not any(o.is_poly for o in image.preds) and not any(o.is_poly for o in image.gt):
        return iou  # boxes only: needs_mask_iou is false for every pair, no need to ask it pair by pair
    mask_pairs = [
        (i, j) for i, p in enumerate(image.preds) for j, g in enumerate(image.gt) if needs_mask_iou(p, g)
    ]
    if not mask_pairs:
        return iou
    if coco is None:
        raise ConfigError("F1-ish on polygons needs a COCO backend for mask IoU; none was given")
    masks = coco.polygon_iou(
        [p.polygon() for p in image.preds], [g.polygon() for g in image.gt], image.width, image.height
    )
    for i, j in mask_pairs:
        iou[i, j] = masks[i, j]
    return iou


def run_f1ish(
    images: Sequence[EvalImage],
    settings: EvalConfig,
    coco: CocoEvaluator | None,
    similarity: Similarity | None,
) -> tuple[dict[str, int | float], dict[float, list[F1ishImage]]]:
    """F1-ish at every threshold of ``eval.f1ish_iou_thrs``; returns the metrics and per-image results."""
    scope = PredScope(settings.f1ish_pred_scope)
    if similarity is not None and isinstance(similarity, EmbeddingSimilarity):
        similarity.prime([normalize_desc(o.desc) for im in images for o in (*im.gt, *im.preds)])
    results: dict[float, list[F1ishImage]] = {thr: [] for thr in settings.f1ish_iou_thrs}
    for image in images:
        eligible = f1ish_scope_mask(image, scope, similarity, settings.semantic.threshold)
        iou = image_iou_matrix(image, coco)
        for thr in settings.f1ish_iou_thrs:
            results[thr].append(
                f1ish_image(image, iou, thr, eligible, similarity, settings.semantic.threshold)
            )
    metrics: dict[str, int | float] = {}
    for thr in settings.f1ish_iou_thrs:
        metrics.update(f1ish_summary(results[thr], thr))
    return metrics, results


def _overlap_candidates(preds: Sequence[EvalObject], keys: dict[str, str]) -> list[int] | None:
    """Indices of the box predictions of one image that can be in a duplicate-like pair (sorted), None if
    none can: two boxes of one description key with a positive pixel overlap.

    The monitor compares boxes in bins, and pixel -> bin is non-decreasing on each axis: boxes that do not
    overlap in pixels (``a.x2 <= b.x1``, ...) do not overlap in bins either, so their IoU is 0, below any
    threshold > 0. Groups without such a pair cannot form a cluster and are left out."""
    groups: dict[str, list[int]] = {}
    for j, o in enumerate(preds):
        if o.kind is GeometryKind.BBOX:
            desc = o.desc
            key = keys.get(desc)
            if key is None:
                key = keys[desc] = duplicate_desc_key(desc)
            groups.setdefault(key, []).append(j)
    if len(groups) == len(preds):  # every box alone under its key (and no polygon): nothing to pair
        return None
    out: list[int] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        boxes = [preds[j].points for j in members]
        if any(
            min(ax2, bx2) > max(ax1, bx1) and min(ay2, by2) > max(ay1, by1)
            for a, (ax1, ay1, ax2, ay2) in enumerate(boxes)
            for bx1, by1, bx2, by2 in boxes[a + 1 :]
        ):
            out += members
    return sorted(out) if out else None


def duplicate_summary(images: Sequence[EvalImage]) -> DuplicateSummary:
    """The duplicate monitor (stage2.md §18.7) over every image's valid predictions taken back to bins.

    Equal to ``summarize_duplicates(objects_in_bins_batch([(i.preds, i.width, i.height) for i in images]))``
    (tests hold it so) with less work: an image whose box predictions cannot pair (see
    :func:`_overlap_candidates`) has the stats of no duplicate, and only the groups that can pair go
    through the pixel -> bin conversion and :func:`duplicate_stats`; a cluster never spans two groups."""
    keys: dict[str, str] = {}
    items: list[DuplicateStats | None] = []
    todo: list[tuple[int, list[int]]] = []
    for k, image in enumerate(images):
        preds = image.preds
        candidates = _overlap_candidates(preds, keys)
        if candidates is not None:
            todo.append((k, candidates))
        items.append(None)
    if todo:
        subsets = [([images[k].preds[j] for j in sel], images[k].width, images[k].height) for k, sel in todo]
        for (k, sel), objects in zip(todo, objects_in_bins_batch(subsets)):
            if not _may_pair_in_bins(objects, keys):
                continue
            part = duplicate_stats(objects)
            items[k] = attrs.evolve(
                part,
                valid_objects=_box_count(images[k].preds),
                clusters=tuple(tuple(sel[i] for i in c) for c in part.clusters),
            )
    return summarize_duplicate_stats(
        [s if s is not None else _no_duplicate(_box_count(im.preds)) for s, im in zip(items, images)]
    )


def _may_pair_in_bins(objects: Sequence[DetObject], keys: dict[str, str]) -> bool:
    """True when two boxes of one description key reach the monitor's IoU threshold in bins, computed by
    :func:`domain.geometry.box_iou` (each entry of the monitor's ``pairwise_box_iou`` equals it exactly)
    on the boxes canonicalised by min / max as the monitor does."""
    groups: dict[str, list[tuple[int, int, int, int]]] = {}
    for o in objects:
        x1, y1, x2, y2 = o.bins
        groups.setdefault(keys[o.desc], []).append((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    return any(
        box_iou(a, b) >= DEFAULT_DUPLICATE_IOU_THRESHOLD
        for boxes in groups.values()
        for i, a in enumerate(boxes)
        for b in boxes[i + 1 :]
    )


def _box_count(preds: Sequence[EvalObject]) -> int:
    return sum(1 for o in preds if o.kind is GeometryKind.BBOX)


def _no_duplicate(boxes: int) -> DuplicateStats:
    return DuplicateStats(valid_objects=boxes, pairs=0, max_cluster_size=1, excess_objects=0, clusters=())


def overlay_file_name(image_id: int) -> str:
    return f"overlay_{image_id:06d}.png"


def draw_overlays(
    images: Sequence[EvalImage],
    artifact: Path,
    k: int,
    setup: OverlaySetup,
    target: Path,
    warn: Warn,
    store: ArtifactStore,
) -> int:
    """The first ``k`` images by image_id with GT (desc above) and predictions (desc and score below)
    into ``target``; an image that cannot be found or read is one warning and is skipped."""
    from application.dataset_images import resolve_image_path
    from application.visualize import discover_image_root

    root = discover_image_root(artifact, setup.image_root, warn=warn)
    drawn = 0
    for image in images[:k]:
        problem = image_path_problem(image.file_name)
        if problem is not None:
            warn(f"overlay for image_id {image.image_id} skipped: image {image.file_name!r}: {problem}")
            continue
        path = resolve_image_path(image.file_name, root.path)
        try:
            pixels = setup.images.read_rgb(path)
        except ImageFileError as exc:
            warn(f"overlay for image_id {image.image_id} ({artifact}:{image.line}) skipped: {exc}")
            continue
        objects = [OverlayObject(OverlayRole.GT, o.kind, o.points, o.desc) for o in image.gt]
        objects += [OverlayObject(OverlayRole.PRED, o.kind, o.points, o.desc, o.score) for o in image.preds]
        target.mkdir(exist_ok=True)
        _write_bytes(
            store,
            target / overlay_file_name(image.image_id),
            setup.renderer.overlay_png(pixels, objects, setup.style),
        )
        drawn += 1
    return drawn


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector off for one evaluation, back to its previous state after.

    An evaluation builds hundreds of thousands of small dicts, lists and value objects that live until
    it ends (records, validated images, the COCO documents, the library's per-image indices); each
    generation-2 pass of the collector walks all of them again, about a quarter of the use case on
    the 5,000-image benchmark. Reference counting still frees everything acyclic at once; a cycle made
    meanwhile waits for the collector's first pass after the evaluation."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def evaluate_artifact(
    artifact: Path,
    settings: EvalConfig,
    output_dir: Path,
    *,
    coco: CocoEvaluator,
    semantic: SemanticStep,
    overlays: OverlaySetup | None = None,
    warn: Warn = warn_runtime,
    lvis: LvisEvaluator | None = None,
    artifacts: ArtifactStore,
) -> EvalSummary:
    """Evaluate ``gt_vs_pred.jsonl`` (§4.1-§4.5) and replace ``output_dir`` with the outputs.

    ``overlays`` is used when ``eval.overlay`` is true; without it the overlays are skipped with a warning.
    ``artifacts`` writes every output.
    """
    with collector_paused():
        return _evaluate_artifact(
            artifact,
            settings,
            output_dir,
            coco=coco,
            semantic=semantic,
            overlays=overlays,
            warn=warn,
            lvis=lvis,
            store=artifacts,
        )


def _evaluate_artifact(
    artifact: Path,
    settings: EvalConfig,
    output_dir: Path,
    *,
    coco: CocoEvaluator,
    semantic: SemanticStep,
    overlays: OverlaySetup | None,
    warn: Warn,
    lvis: LvisEvaluator | None,
    store: ArtifactStore,
) -> EvalSummary:
    check_settings(settings)
    official_gt = None
    image_info = False  # an image-info ground truth (COCO test-dev): export coco_preds.json, score nothing
    if settings.coco_gt_json is not None and settings.metrics != "f1ish":
        raw_gt = _read_json(Path(settings.coco_gt_json))
        image_info = isinstance(raw_gt, dict) and is_image_info(raw_gt)
        official_gt = canonical_coco_gt(raw_gt, str(settings.coco_gt_json), image_info=image_info)
    lvis_used = None
    if settings.dataset_style == "lvis" and official_gt is not None and not image_info:
        lvis_used = require_lvis(settings, lvis, official_gt, str(settings.coco_gt_json))
    images = prepare_images(Path(artifact), ScoreMode(settings.score_mode), settings.num_workers)
    similarity = EmbeddingSimilarity(semantic.encoder) if semantic.encoder is not None else None

    counters = count_images(images)
    metrics: dict[str, int | float] = {}
    files: dict[str, str] = {}
    optional: dict[str, str] = {}
    f1ish_results: dict[float, list[F1ishImage]] = {}

    no_metrics_reason: str | None = None
    if image_info:
        no_metrics_reason = (
            f"no metric was computed: {settings.coco_gt_json} has no annotations (an image-info file, "
            "e.g. COCO test-dev); coco_preds.json is the export to submit to the evaluation server"
        )
        warn(no_metrics_reason)

    if settings.metrics in ("coco", "both"):
        part = _run_coco(
            images, settings, coco, similarity, official_gt, Path(artifact), lvis_used, score=not image_info
        )
        metrics.update(part.metrics)
        counters.update(part.mapping_counts)
        if part.evaluations:
            files["per_class.csv"] = per_class_csv(part.evaluations[0], part.table)
            files["pr_curves.json"] = json_text({"iou_type": "bbox", **part.evaluations[0].curves.to_json()})
        if lvis_used is not None:
            files[PER_FREQUENCY_JSON] = json_text(
                per_frequency_document([e for e in part.evaluations if isinstance(e, LvisEvaluation)])
            )
        if part.gt_document is not None:
            files["coco_gt.json"] = json_compact(part.gt_document)
        files["coco_preds.json"] = json_compact(part.predictions)
        if part.report is not None:
            optional["semantic_desc_report.json"] = json_text(part.report)

    if settings.metrics in ("f1ish", "both") and not image_info:
        f1ish_metrics, f1ish_results = run_f1ish(images, settings, coco, similarity)
        metrics.update(f1ish_metrics)
        for thr in settings.f1ish_iou_thrs:
            undefined = f1ish_undefined_problem(f1ish_metrics, thr)
            if undefined is not None:
                warn(f"{artifact}: {undefined}")
        primary = primary_f1ish_threshold(settings.f1ish_iou_thrs)
        scope = PredScope(settings.f1ish_pred_scope)
        for thr, results in f1ish_results.items():
            files[matches_file_name(thr, primary)] = jsonl_text(
                [match_row(image, result, scope) for image, result in zip(images, results)]
            )

    # stage2.md §18.7: the duplicate monitor Channel B logs, on the valid predictions taken back to bins.
    metrics.update(duplicate_summary(images).metrics())
    files["per_image.json"] = json_compact(
        [
            per_image_entry(image, {thr: f1ish_results[thr][k] for thr in f1ish_results})
            for k, image in enumerate(images)
        ]
    )
    summary_meta = _meta(
        settings, coco.backend, "official" if official_gt is not None else "artifact", semantic, len(images)
    )
    if no_metrics_reason is not None:
        summary_meta["metrics_computed"] = False
        summary_meta["no_metrics_reason"] = no_metrics_reason
    with staged_directory(Path(output_dir), store) as staging:
        for name, text in optional.items():
            if not write_best_effort(store, staging / name, text):
                counters["semantic_report_failed"] += 1
        for name, text in files.items():
            _write_file(store, staging / name, text)
        if settings.overlay:
            if overlays is None:
                warn("eval.overlay is true but no image renderer was given; overlays skipped")
            else:
                draw_overlays(
                    images, Path(artifact), settings.overlay_k, overlays, staging / OVERLAY_DIR, warn, store
                )
        summary = EvalSummary(metrics=metrics, counters=counters, meta=summary_meta)
        _write_file(store, staging / "metrics.json", json_text(summary.to_json()))
    return summary


def evaluate_coco_results(
    results_json: Path,
    gt_json: Path,
    settings: EvalConfig,
    output_dir: Path,
    *,
    coco: CocoEvaluator,
    lvis: LvisEvaluator | None = None,
    artifacts: ArtifactStore,
) -> EvalSummary:
    """COCO metrics only (§4.1 second bullet): a COCO results JSON against an official COCO GT
    (an LVIS annotation file and federated AP with ``eval.dataset_style: lvis``)."""
    store = artifacts
    check_settings(settings)
    raw_gt = _read_json(Path(gt_json))
    if isinstance(raw_gt, dict) and is_image_info(raw_gt):
        raise ArtifactError(
            f"{gt_json}: an image-info file (no 'annotations'): a COCO results file cannot be scored "
            "against it; it is accepted only to export coco_preds.json from an artifact"
        )
    gt = canonical_coco_gt(raw_gt, str(gt_json))
    lvis_used = require_lvis(settings, lvis, gt, str(gt_json)) if settings.dataset_style == "lvis" else None
    results = _read_json(Path(results_json))
    if not isinstance(results, list) or not all(isinstance(r, dict) for r in results):
        raise ArtifactError(f"{results_json}: a COCO results file must be a JSON list of objects")
    for i, r in enumerate(results):
        if "image_id" in r:
            results[i] = {
                **r,
                "image_id": canonical_coco_id(r["image_id"], f"{results_json}: [{i}].image_id"),
            }
    with_segm = settings.use_segm and has_polygon_segmentation(gt)
    evaluations: list[CocoEvaluation | LvisEvaluation] = []
    if lvis_used is not None:
        evaluations += lvis_evaluations(
            lvis_used, gt, results, with_segm=with_segm, iou_thrs=settings.iou_thrs, img_ids=None
        )
    else:
        evaluations.append(coco.evaluate(gt, results, "bbox", iou_thrs=settings.iou_thrs))
    if with_segm and lvis_used is None:
        evaluations.append(coco.evaluate(gt, results, "segm", iou_thrs=settings.iou_thrs))
    metrics: dict[str, int | float] = {}
    for evaluation in evaluations:
        metrics.update(evaluation.metrics())
    counters = empty_counters()
    counters["images"] = len(gt["images"])
    counters["gt_objects"] = len(gt["annotations"])
    counters["pred_objects"] = len(results)
    step = SemanticStep.off("not used: COCO results input")
    summary = EvalSummary(
        metrics=metrics,
        counters=counters,
        meta=_meta(settings, coco.backend, "official", step, len(gt["images"])),
    )
    table = CategoryTable([_category(c) for c in gt["categories"]])
    with staged_directory(Path(output_dir), store) as staging:
        _write_file(store, staging / "per_class.csv", per_class_csv(evaluations[0], table))
        if lvis_used is not None:
            lvis_parts = [e for e in evaluations if isinstance(e, LvisEvaluation)]
            _write_file(store, staging / PER_FREQUENCY_JSON, json_text(per_frequency_document(lvis_parts)))
        _write_file(
            store,
            staging / "pr_curves.json",
            json_text({"iou_type": "bbox", **evaluations[0].curves.to_json()}),
        )
        _write_file(store, staging / "metrics.json", json_text(summary.to_json()))
    return summary


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except OSError as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    except ValueError as exc:
        raise ArtifactError(f"{path} is not valid JSON: {exc}") from exc


def run_evaluation(
    settings: EvalConfig,
    artifact: Path | None,
    output_dir: Path,
    *,
    coco: CocoEvaluator,
    semantic: SemanticStep,
    overlays: OverlaySetup | None = None,
    lvis: LvisEvaluator | None = None,
    artifacts: ArtifactStore,
) -> EvalSummary:
    """The eval stage: a COCO results file when ``eval.coco_results_json`` is set, else the artifact."""
    if settings.coco_results_json is not None:
        if settings.coco_gt_json is None:
            raise ConfigError("'eval.coco_gt_json' is required with 'eval.coco_results_json'")
        return evaluate_coco_results(
            Path(settings.coco_results_json), Path(settings.coco_gt_json), settings, output_dir,
            coco=coco, lvis=lvis, artifacts=artifacts,
        )  # fmt: skip
    if artifact is None:
        raise ConfigError(
            "no artifact to evaluate: set 'infer.gt_vs_pred_jsonl' or 'run.output_dir' + 'run.name'"
        )
    return evaluate_artifact(
        Path(artifact), settings, output_dir, coco=coco, semantic=semantic, overlays=overlays, lvis=lvis,
        artifacts=artifacts,
    )  # fmt: skip


@attrs.frozen(eq=False)
class EvaluateDependencies:
    """The ports of one evaluation (the entry point's: :func:`default_dependencies`; tests: fakes)."""

    artifacts: ArtifactStore
    coco: CocoEvaluator
    semantic: SemanticStep
    lvis: LvisEvaluator | None = None
    overlays: OverlaySetup | None = None
    warn: Warn = warn_runtime


def evaluate(
    settings: EvalConfig, artifact: Path | None, output_dir: Path, deps: EvaluateDependencies
) -> EvalSummary:
    """:func:`run_evaluation` with every port from ``deps``."""
    if settings.coco_results_json is not None or artifact is None:
        return run_evaluation(
            settings, artifact, output_dir, coco=deps.coco, semantic=deps.semantic, overlays=deps.overlays,
            lvis=deps.lvis, artifacts=deps.artifacts,
        )  # fmt: skip
    return evaluate_artifact(
        Path(artifact), settings, output_dir, coco=deps.coco, semantic=deps.semantic, overlays=deps.overlays,
        warn=deps.warn, lvis=deps.lvis, artifacts=deps.artifacts,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def resolve_paths(config: Any) -> tuple[Path | None, Path]:
    """``(artifact, output_dir)`` from ``infer.gt_vs_pred_jsonl`` / ``eval.output_dir`` or ``run_dir`` (§2.3)."""
    run = config.run
    run_dir: Path | None = None
    if run is not None and run.name is not None and run.output_dir is not None:
        run_dir = Path(run.output_dir) / run.name
    artifact = config.infer.gt_vs_pred_jsonl
    if artifact is None and run_dir is not None and config.eval.coco_results_json is None:
        artifact = run_dir / "gt_vs_pred.jsonl"
    output_dir = config.eval.output_dir
    if output_dir is None:
        if run_dir is None:
            raise ConfigError(
                "set 'eval.output_dir', or 'run.output_dir' and 'run.name' to derive <run_dir>/eval"
            )
        output_dir = run_dir / "eval"
    return (Path(artifact) if artifact is not None else None), Path(output_dir)


PROG = "application.evaluate"


def main(argv: Sequence[str] | None = None) -> int:
    from application.cli import run_entry_point

    return run_entry_point(argv, PROG, _evaluate_main)


def default_dependencies(settings: EvalConfig, image_root: Path | None) -> EvaluateDependencies:
    """The ports of ``python -m application.evaluate``, from :mod:`application.wiring` (the entry point's
    composition; the use case receives them)."""
    from application import wiring

    return EvaluateDependencies(
        artifacts=wiring.make_artifact_store(),
        coco=wiring.make_coco_evaluator(settings.coco_backend),
        semantic=wiring.make_semantic_step(settings.semantic),
        lvis=wiring.make_lvis_evaluator(settings.lvis_backend) if settings.dataset_style == "lvis" else None,
        overlays=(
            OverlaySetup(wiring.make_image_renderer(), wiring.make_image_store(), image_root)
            if settings.overlay
            else None
        ),
    )


def _evaluate_main(config_path: Path) -> int:
    from application.config import check_local_paths, load_config

    loaded = load_config(config_path, entry_point="evaluate")
    config = loaded.config
    check_local_paths(config, "evaluate")
    settings: EvalConfig = config.eval
    check_settings(settings)
    artifact, output_dir = resolve_paths(config)
    deps = default_dependencies(settings, config.data.image_root)
    from application.run_lock import hold_run_directory

    with hold_run_directory(config, PROG, fallback=output_dir):
        summary = evaluate(settings, artifact, output_dir, deps)
    headline = {
        k: v
        for k, v in summary.metrics.items()
        if k in ("bbox_AP", "bbox_AP50", "segm_AP") or k.endswith("f1_full_micro")
    }
    print(json.dumps({"output_dir": str(output_dir), **headline}, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
