"""The offline converter (data.md §9): COCO / LVIS instances JSON -> the JSONL record contract.

    python -m application.prepare_data --config FILE

One run converts one annotation file into one split (``data.convert.split``): it writes resized
images under ``<output_dir>/images/<split>/``, ``<output_dir>/<split>.jsonl``, ``categories.json``
and ``convert_report.json`` (the report holds one entry per split converted into that directory),
then validates its own output with the training loader, image sizes included (§9.7).

Images are processed in ascending image id; each is scanned (header, size check, geometry) and the
kept ones are written, both in a thread pool of ``workers`` threads whose results are consumed in
order, so the output is byte-identical for any ``workers`` value (§9.2, test 52).
"""

from __future__ import annotations

import sys
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import attrs

from application.dataset_images import ImageVerdictCache, check_images_eager
from domain.conversion import (
    IMAGE_DROPS,
    OBJECT_DROPS,
    Category,
    ConversionDrop,
    ConversionFallback,
    GeometryMode,
    GeometrySettings,
    ImageConversion,
    MultipartPolicy,
    SourceAnnotation,
    SourceFormat,
    SourceImage,
    convert_image,
    output_file_name,
    parse_annotation,
    parse_category,
    parse_image,
)
from domain.errors import (
    ArtifactError,
    ConfigError,
    ConversionError,
    ImageFileError,
    InvariantViolation,
)
from domain.objects import GeometryKind, Ordering
from domain.records import Record, parse_jsonl_records, record_to_json_line
from ports.storage import ArtifactStore, ImageFormat, ImageStore, OrientationPolicy

PROG = "python -m application.prepare_data"
REPORT_FILE = "convert_report.json"
CATEGORIES_FILE = "categories.json"
REPORT_SCHEMA_VERSION = 1
UNCHECKED_SUFFIX = ".unchecked"

T = TypeVar("T")
R = TypeVar("R")


# ------------------------------------------------------------------------------------------------
# Settings


@attrs.frozen
class ConvertSettings:
    """Everything one converter run needs: ``data.convert.*`` (data.md §9.2) plus ``data.max_pixels``
    (inside ``geometry``)."""

    source: SourceFormat
    annotations: Path
    image_root: Path
    output_dir: Path
    split: str
    geometry: GeometrySettings = attrs.field(factory=GeometrySettings)
    exif_orientation: OrientationPolicy = OrientationPolicy.IGNORE
    skip_bad_images: bool = False
    jpeg_quality: int = 95
    workers: int = 8
    limit: int | None = None

    def __attrs_post_init__(self) -> None:
        problems = []
        if not self.split or "/" in self.split or "\\" in self.split or self.split in (".", ".."):
            problems.append(f"data.convert.split: must be a plain name; got {self.split!r}")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"data.convert.jpeg_quality: must be in [1, 100]; got {self.jpeg_quality}")
        if self.workers < 1:
            problems.append(f"data.convert.workers: must be >= 1; got {self.workers}")
        if self.limit is not None and self.limit < 1:
            problems.append(f"data.convert.limit: must be >= 1 or null; got {self.limit}")
        if problems:
            raise ConfigError(problems)

    @classmethod
    def from_config(cls, data: Any) -> ConvertSettings:
        """From the typed ``data`` block (``application.config.schema.DataConfig``)."""
        convert = data.convert
        if convert is None:
            raise ConfigError("data.convert: required by application.prepare_data (data.md §9.2)")
        return cls(
            source=SourceFormat(convert.source),
            annotations=Path(convert.annotations),
            image_root=Path(convert.image_root),
            output_dir=Path(convert.output_dir),
            split=convert.split,
            geometry=GeometrySettings(
                geometry=GeometryMode(convert.geometry),
                poly_multipart=MultipartPolicy(convert.poly_multipart),
                poly_max_points=convert.poly_max_points,
                drop_crowd=convert.drop_crowd,
                keep_empty=convert.keep_empty,
                max_objects=convert.max_objects,
                min_pixels=convert.min_pixels,
                max_pixels=data.max_pixels,
            ),
            exif_orientation=OrientationPolicy(convert.exif_orientation),
            skip_bad_images=convert.skip_bad_images,
            jpeg_quality=convert.jpeg_quality,
            workers=convert.workers,
            limit=convert.limit,
        )

    @property
    def jsonl_path(self) -> Path:
        return self.output_dir / f"{self.split}.jsonl"

    @property
    def images_dir(self) -> Path:
        return self.output_dir / "images" / self.split

    def to_json(self) -> dict[str, Any]:
        """The settings under their config key names (``data.convert.*`` and ``data.max_pixels``)."""
        g = self.geometry
        return {
            "source": self.source.value,
            "annotations": str(self.annotations),
            "image_root": str(self.image_root),
            "output_dir": str(self.output_dir),
            "split": self.split,
            "geometry": g.geometry.value,
            "poly_multipart": g.poly_multipart.value,
            "poly_max_points": g.poly_max_points,
            "drop_crowd": g.drop_crowd,
            "keep_empty": g.keep_empty,
            "max_objects": g.max_objects,
            "min_pixels": g.min_pixels,
            "max_pixels": g.max_pixels,
            "exif_orientation": self.exif_orientation.value,
            "skip_bad_images": self.skip_bad_images,
            "jpeg_quality": self.jpeg_quality,
            "workers": self.workers,
            "limit": self.limit,
        }


# ------------------------------------------------------------------------------------------------
# Source dataset


@attrs.frozen
class SourceDataset:
    """The parsed instances JSON: images in ascending id, annotations per image, categories by id."""

    images: tuple[SourceImage, ...]
    annotations: Mapping[int, tuple[SourceAnnotation, ...]]
    categories: tuple[Category, ...]

    @property
    def descs(self) -> dict[int, str]:
        return {c.id: c.desc for c in self.categories}


def _list_field(document: Mapping[str, Any], key: str, path: Path) -> list[Any]:
    value = document.get(key)
    if not isinstance(value, list):
        raise ConversionError(f"{path}: '{key}' must be a list; got {type(value).__name__}")
    return value


def parse_source(document: Any, source: SourceFormat, path: Path) -> SourceDataset:
    """Parse an instances JSON document (non-integers as ``Decimal``) into a :class:`SourceDataset`."""
    if not isinstance(document, dict):
        raise ConversionError(f"{path}: an instances JSON must be an object with images/annotations/categories")
    try:
        categories = [parse_category(c, i) for i, c in enumerate(_list_field(document, "categories", path))]
        images = [parse_image(im, i, source) for i, im in enumerate(_list_field(document, "images", path))]
        anns = [parse_annotation(a, i) for i, a in enumerate(_list_field(document, "annotations", path))]
    except ConversionError as exc:
        raise ConversionError(f"{path}: {exc}") from None
    problems: list[str] = []
    for what, ids in (("category", [c.id for c in categories]), ("image", [im.image_id for im in images]),
                      ("annotation", [a.ann_id for a in anns])):
        duplicates = sorted(k for k, n in Counter(ids).items() if n > 1)
        if duplicates:
            problems.append(f"duplicate {what} ids {duplicates[:10]}")
    image_ids = {im.image_id for im in images}
    per_image: dict[int, list[SourceAnnotation]] = {}
    for ann in anns:
        if ann.image_id not in image_ids:
            problems.append(f"annotation id {ann.ann_id} refers to image id {ann.image_id}, which is not in 'images'")
            continue
        per_image.setdefault(ann.image_id, []).append(ann)
    if problems:
        raise ConversionError(f"{path}: " + "; ".join(problems[:20]))
    return SourceDataset(
        images=tuple(sorted(images, key=lambda im: im.image_id)),
        annotations={k: tuple(v) for k, v in per_image.items()},
        categories=tuple(sorted(categories, key=lambda c: c.id)),
    )


# ------------------------------------------------------------------------------------------------
# Per-image work


@attrs.frozen
class ImagePlan:
    """The scan result of one image (position = index in ascending image id)."""

    position: int
    image: SourceImage
    source_path: Path
    conversion: ImageConversion | None = None
    drop: ConversionDrop | None = None
    detail: str = ""
    copy: bool = False
    image_format: ImageFormat = ImageFormat.PNG
    output_name: str = ""


@attrs.frozen
class WriteOutcome:
    plan: ImagePlan
    record: Record | None
    drop: ConversionDrop | None = None
    detail: str = ""


def _file_drop(exc: ImageFileError) -> ConversionDrop:
    return ConversionDrop.MISSING_IMAGE if exc.kind == "missing" else ConversionDrop.UNREADABLE_IMAGE


class _Converter:
    def __init__(
        self, settings: ConvertSettings, dataset: SourceDataset, images: ImageStore
    ) -> None:
        self.settings = settings
        self.dataset = dataset
        self.images = images
        self.descs = dataset.descs

    def scan(self, position: int, image: SourceImage) -> ImagePlan:
        """§9.3 steps 1-3 and 5-6: resolve, read the header, check the size, convert annotations."""
        s = self.settings
        path = s.image_root / image.relative_path
        try:
            header = self.images.read_header(path)
        except ImageFileError as exc:
            return ImagePlan(position, image, path, drop=_file_drop(exc), detail=str(exc))
        decoded = header.size_under(s.exif_orientation)
        if decoded != image.size:
            tag = f"EXIF orientation {header.orientation}" if header.orientation is not None else "no EXIF orientation"
            return ImagePlan(
                position, image, path, drop=ConversionDrop.IMAGE_SIZE_MISMATCH,
                detail=(f"file is {decoded} under exif_orientation: {s.exif_orientation.value} ({tag}), "
                        f"instances JSON says {image.size}: {path}"),
            )
        conversion = convert_image(self.dataset.annotations.get(image.image_id, ()), self.descs, image.size, s.geometry)
        if conversion.drop is not None or conversion.target is None:
            return ImagePlan(position, image, path, conversion=conversion, drop=conversion.drop)
        copy = conversion.target == header.size and not header.has_orientation_change
        jpeg = header.format == "JPEG"
        return ImagePlan(
            position, image, path, conversion=conversion, copy=copy,
            image_format=ImageFormat.JPEG if jpeg else ImageFormat.PNG,
            output_name=output_file_name(image.relative_path, copied=copy, jpeg_output=jpeg),
        )

    def write(self, plan: ImagePlan) -> WriteOutcome:
        """§9.3 steps 4 and 7: write the image (byte copy or resize), build the record."""
        s = self.settings
        conversion = plan.conversion
        if conversion is None or conversion.target is None:
            raise InvariantViolation(f"image id {plan.image.image_id} has no conversion to write")
        target = conversion.target
        destination = s.images_dir / plan.output_name
        try:
            if plan.copy:
                self.images.read_rgb(plan.source_path)  # decode once: a truncated file is unreadable_image
                self.images.copy_bytes(plan.source_path, destination)
            else:
                written = self.images.write_converted(
                    plan.source_path, destination, size=target, orientation=s.exif_orientation,
                    image_format=plan.image_format, jpeg_quality=s.jpeg_quality,
                )
                if written != target:
                    raise InvariantViolation(f"{destination}: wrote {written}, planned {target}")
        except ImageFileError as exc:
            return WriteOutcome(plan, None, _file_drop(exc), str(exc))
        image = plan.image
        metadata: dict[str, Any] = {
            "source": s.source.value,
            "image_id": image.image_id,
            "file_name": image.relative_path,
            "orig_width": image.size.width,
            "orig_height": image.size.height,
        }
        if s.source is SourceFormat.LVIS:
            metadata["neg_category_ids"] = list(image.neg_category_ids or ())
            metadata["not_exhaustive_category_ids"] = list(image.not_exhaustive_category_ids or ())
        record = Record(
            images=(f"images/{s.split}/{plan.output_name}",),
            width=target.width,
            height=target.height,
            objects=tuple(o.det for o in conversion.objects),
            category_ids=tuple(o.category_id for o in conversion.objects),
            ann_ids=tuple(o.ann_id for o in conversion.objects),
            metadata=metadata,
        )
        return WriteOutcome(plan, record)


def _ordered_map(pool: ThreadPoolExecutor | None, fn: Callable[[T], R], items: Sequence[T]) -> Iterator[R]:
    """``map`` in input order, in the pool when there is one (results never depend on the pool)."""
    if pool is None:
        return map(fn, items)
    return pool.map(fn, items)


# ------------------------------------------------------------------------------------------------
# The use case


@attrs.frozen
class ConvertResult:
    jsonl_path: Path
    categories_path: Path
    report_path: Path
    report: Mapping[str, Any]
    records: tuple[Record, ...]


class _Progress:
    """A tqdm bar on stderr when it is a terminal (silent otherwise, e.g. in tests and logs)."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self._bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # progress is cosmetic; never fail a conversion for it
                return
            self._bar = tqdm(total=total, desc=desc, unit="img", disable=None, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None and n:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _raise_bad_image(plan: ImagePlan, drop: ConversionDrop, detail: str) -> None:
    raise ConversionError(
        f"image id {plan.image.image_id} ({plan.image.relative_path}): {drop.value}: {detail}. "
        "Fix the file or the instances JSON, or set data.convert.skip_bad_images: true to drop and count such images"
    )


_IO_DROPS = (ConversionDrop.MISSING_IMAGE, ConversionDrop.UNREADABLE_IMAGE, ConversionDrop.IMAGE_SIZE_MISMATCH)


def convert_dataset(
    settings: ConvertSettings,
    *,
    artifacts: ArtifactStore,
    images: ImageStore,
    progress: bool = True,
    echo: Callable[[str], None] | None = print,
) -> ConvertResult:
    """Run the converter of data.md §9 and its self-check; returns the paths and the split's report.

    Raises ConversionError for bad source data (and bad images unless ``skip_bad_images``) and
    DataContractError when the written output fails the training loader's checks.
    """
    s = settings
    document = artifacts.read_json(s.annotations, exact_numbers=True)
    dataset = parse_source(document, s.source, s.annotations)
    converter = _Converter(s, dataset, images)
    order = list(enumerate(dataset.images))

    scanned_drops: list[ImagePlan] = []
    written: list[WriteOutcome] = []
    failed: list[WriteOutcome] = []
    pending: deque[ImagePlan] = deque()
    names: dict[str, int] = {}
    remaining = s.limit if s.limit is not None else len(order)
    window = max(16, 4 * s.workers)
    next_index = 0
    bar = _Progress(len(order), progress, f"prepare_data {s.split}")
    pool = ThreadPoolExecutor(max_workers=s.workers, thread_name_prefix="prepare-data") if s.workers > 1 else None
    try:
        while remaining > 0:
            if not pending:
                if next_index >= len(order):
                    break
                batch = order[next_index:next_index + window]
                next_index += len(batch)
                for plan in _ordered_map(pool, lambda item: converter.scan(*item), batch):
                    if plan.drop is None:
                        pending.append(plan)
                        continue
                    if plan.drop in _IO_DROPS and not s.skip_bad_images:
                        _raise_bad_image(plan, plan.drop, plan.detail)
                    scanned_drops.append(plan)
                    bar.update()
                continue
            take = [pending.popleft() for _ in range(min(remaining, len(pending)))]
            for plan in take:
                other = names.setdefault(plan.output_name, plan.image.image_id)
                if other != plan.image.image_id:
                    raise ConversionError(
                        f"images id {other} and id {plan.image.image_id} would both be written as "
                        f"{s.images_dir / plan.output_name}; convert them into different splits"
                    )
            for outcome in _ordered_map(pool, converter.write, take):
                bar.update()
                if outcome.record is None:
                    assert outcome.drop is not None
                    if not s.skip_bad_images:
                        _raise_bad_image(outcome.plan, outcome.drop, outcome.detail)
                    failed.append(outcome)
                else:
                    written.append(outcome)
                    remaining -= 1
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        bar.close()

    # With a limit, images after the last written one were never considered: they are not counted.
    cutoff = written[-1].plan.position if (s.limit is not None and remaining == 0 and written) else len(order)
    counted_drops = [p for p in scanned_drops if p.position <= cutoff]
    records = tuple(o.record for o in written if o.record is not None)

    # Outputs: JSONL (checked before it takes its final name), categories, report.
    unchecked = s.jsonl_path.with_name(s.jsonl_path.name + UNCHECKED_SUFFIX)
    artifacts.write_lines(unchecked, (record_to_json_line(r) for r in records))
    categories_path = s.output_dir / CATEGORIES_FILE
    artifacts.write_json(categories_path, [c.to_json() for c in dataset.categories])
    self_check(unchecked, settings, artifacts=artifacts, images=images, expected=len(records))
    artifacts.replace(unchecked, s.jsonl_path)

    split_report = _split_report(
        settings, artifacts.sha256(s.annotations), images.library_versions(), len(order), written, failed,
        counted_drops,
    )
    report_path = s.output_dir / REPORT_FILE
    artifacts.write_json(report_path, _merged_report(artifacts, report_path, s.split, split_report))
    if echo is not None:
        echo(summary_text(settings, split_report))
    return ConvertResult(s.jsonl_path, categories_path, report_path, split_report, records)


def self_check(
    jsonl: Path, settings: ConvertSettings, *, artifacts: ArtifactStore, images: ImageStore, expected: int
) -> None:
    """§9.7: load the written JSONL with the training validator, image sizes included; any failure
    raises (DataContractError naming file, line and resolved path)."""
    lines = ((line.number, line.text) for line in artifacts.read_lines(jsonl))
    record_set = parse_jsonl_records(
        lines, str(jsonl), max_pixels=settings.geometry.max_pixels, bbox_only=False, ordering=Ordering.SORTED
    )
    if len(record_set) != expected:
        raise InvariantViolation(f"{jsonl}: self-check read {len(record_set)} records, wrote {expected}")
    # every image is decoded; the clean verdicts are cached so the first training run does not decode again
    check_images_eager(
        record_set, jsonl.parent, images, workers=settings.workers, cache=ImageVerdictCache(artifacts, jsonl.parent)
    )


# ------------------------------------------------------------------------------------------------
# Report and summary


def _counts(values: Iterable[str], keys: Iterable[str]) -> dict[str, int]:
    counter = Counter(values)
    return {k: counter.get(k, 0) for k in keys}


def _split_report(
    settings: ConvertSettings,
    annotations_sha256: str,
    library_versions: Mapping[str, str],
    source_images: int,
    written: Sequence[WriteOutcome],
    failed: Sequence[WriteOutcome],
    scanned_drops: Sequence[ImagePlan],
) -> dict[str, Any]:
    considered = [o.plan for o in written] + [o.plan for o in failed] + list(scanned_drops)
    conversions = [p.conversion for p in considered if p.conversion is not None]
    image_drops = [p.drop.value for p in scanned_drops if p.drop is not None]
    image_drops += [o.drop.value for o in failed if o.drop is not None]
    objects = [obj for o in written if o.record is not None for obj in o.record.objects]
    return {
        "settings": settings.to_json(),
        "annotations_sha256": annotations_sha256,
        "library_versions": dict(sorted(library_versions.items())),
        "images": {
            "source": source_images,
            "considered": len(considered),
            "written": len(written),
            "resized": sum(1 for o in written if not o.plan.copy),
            "copied": sum(1 for o in written if o.plan.copy),
            "dropped": _counts(image_drops, (d.value for d in IMAGE_DROPS)),
        },
        "objects": {
            "written": len(objects),
            "bbox_2d": sum(1 for o in objects if o.kind is GeometryKind.BBOX),
            "poly": sum(1 for o in objects if o.kind is GeometryKind.POLY),
            "dropped": _counts((d.value for c in conversions for d in c.object_drops), (d.value for d in OBJECT_DROPS)),
        },
        "fallbacks": _counts((f.value for c in conversions for f in c.fallbacks), (f.value for f in ConversionFallback)),
    }


def _merged_report(artifacts: ArtifactStore, path: Path, split: str, split_report: Mapping[str, Any]) -> dict[str, Any]:
    """``convert_report.json`` keeps one entry per split converted into the same output directory."""
    splits: dict[str, Any] = {}
    try:
        existing = artifacts.read_json(path)
    except ArtifactError:
        existing = None
    if isinstance(existing, dict) and existing.get("schema_version") == REPORT_SCHEMA_VERSION:
        previous = existing.get("splits")
        if isinstance(previous, dict):
            splits.update(previous)
    splits[split] = split_report
    return {"schema_version": REPORT_SCHEMA_VERSION, "splits": dict(sorted(splits.items()))}


def _nonzero(counts: Mapping[str, int]) -> str:
    shown = [f"{k} {v}" for k, v in counts.items() if v]
    return ", ".join(shown) if shown else "none"


def summary_text(settings: ConvertSettings, report: Mapping[str, Any]) -> str:
    im, ob, fb = report["images"], report["objects"], report["fallbacks"]
    limit = f" (limit {settings.limit}: {im['considered']} of them considered)" if settings.limit is not None else ""
    images = (
        f"  images : {im['source']} in source{limit}; {im['written']} written "
        f"({im['resized']} resized, {im['copied']} copied); dropped: {_nonzero(im['dropped'])}"
    )
    objects = (
        f"  objects: {ob['written']} written ({ob['bbox_2d']} bbox_2d, {ob['poly']} poly); "
        f"dropped: {_nonzero(ob['dropped'])}"
    )
    outputs = (
        f"  wrote {settings.jsonl_path} (self-check passed), {settings.output_dir / CATEGORIES_FILE}, "
        f"{settings.output_dir / REPORT_FILE}"
    )
    header = f"prepare_data: split '{settings.split}' from {settings.source.value} {settings.annotations}"
    return "\n".join([header, images, objects, f"  fallbacks: {_nonzero(fb)}", outputs])


# ------------------------------------------------------------------------------------------------
# Entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m application.prepare_data --config FILE``; exit status 1 on a conversion error."""
    from application.cli import run_entry_point
    from application.config import check_local_paths, load_config
    from application.wiring import make_artifact_store, make_image_store

    def body(config_path: Path) -> int:
        loaded = load_config(config_path, entry_point="prepare_data")
        check_local_paths(loaded.config, "prepare_data")
        settings = ConvertSettings.from_config(loaded.config.data)
        convert_dataset(settings, artifacts=make_artifact_store(), images=make_image_store())
        return 0

    return run_entry_point(argv, PROG, body)


if __name__ == "__main__":
    sys.exit(main())
