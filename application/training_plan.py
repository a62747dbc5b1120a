"""Sample lengths and the static pack plan of a training split (data.md §6.5, §8.2), before any model loads.

The use case's pre-step: every sample of a split is rendered exactly as the engine's dataset renders it
(:func:`ports.training.training_chat_sample`, objects in record order), measured with the configured
tokenizer and chat template (over-long samples raise, naming each), and the train split's packs are planned
with ``domain.packing`` or reused from the run directory's plan cache when its fingerprint matches. The plan
files (``pack_plan_cache.json``, ``pack_plan.json``) are written through the storage port after the run files.
Stage 2 plans its Channel-A samples with the same functions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from domain.packing import (
    PackingSettings,
    PackPlan,
    PlanFingerprint,
    cached_or_planned,
    plan_cache_text,
    plan_packs,
)
from domain.records import Record, RecordSet
from domain.training_samples import SampleSource, build_sources
from ports.storage import ArtifactStore
from ports.tokenizer import ChatSample, SampleEncoderPort
from ports.training import SampleSettings, UnitPlan, training_chat_sample

PLAN_CACHE_FILE = "pack_plan_cache.json"
PLAN_REPORT_FILE = "pack_plan.json"
#: The files of a checkpoint the sample lengths (hence the plan) depend on.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "special_tokens_map.json",
    "added_tokens.json",
)


def split_sources(records: Sequence[Record], images: Sequence[Path]) -> tuple[SampleSource, ...]:
    return build_sources(records, [str(p) for p in images])


def training_samples(sources: Sequence[SampleSource], settings: SampleSettings) -> list[ChatSample]:
    """The conversations the length pre-pass measures (objects in record order, data.md §6.5): the one place
    the pre-pass builds them, for training and for ``validate_dataset``."""
    return [training_chat_sample(s, settings, s.record.objects) for s in sources]


def sample_lengths_of(
    encoder: SampleEncoderPort, settings: SampleSettings
) -> Callable[[RecordSet, Sequence[Path]], list[int]]:
    """Token lengths of records (with their image files) exactly as the training pre-pass measures them
    (``validate_dataset``'s length check): the same conversations, the same encoder, no second computation."""

    def lengths(records: RecordSet, images: Sequence[Path]) -> list[int]:
        return encoder.lengths(training_samples(split_sources(tuple(records), images), settings))

    return lengths


def sha256_files(paths: Sequence[Path]) -> str:
    """One digest over the names and bytes of ``paths`` (a missing file hashes as ``<absent>``)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode("utf-8"))
        digest.update(path.read_bytes() if path.is_file() else b"<absent>")
    return digest.hexdigest()


def tokenizer_fingerprint(model_path: Path) -> str:
    """Hash of the tokenizer and chat-template files of a checkpoint (the plan depends on them)."""
    return sha256_files([Path(model_path) / name for name in TOKENIZER_FILES])


def plan_split(
    sources: Sequence[SampleSource],
    encoder: SampleEncoderPort,
    settings: SampleSettings,
    *,
    max_length: int,
    packing: PackingSettings | None,
    fingerprint_inputs: tuple[str, str] | None = None,
    cache_text: str | None = None,
) -> UnitPlan:
    """Lengths without decoding images (over-long samples raise) and, with ``packing``, the static pack plan.

    ``fingerprint_inputs`` = (JSONL sha256, tokenizer+template sha256) enables the plan cache: a cached plan
    with the same fingerprint and lengths is reused, anything else is planned afresh.
    """
    lengths = tuple(encoder.checked_lengths(training_samples(sources, settings), max_length))
    if packing is None:
        return UnitPlan(None, lengths)
    locations = [s.location for s in sources]
    if fingerprint_inputs is None:
        plan = plan_packs(lengths, packing, seed=settings.seed, locations=locations)
        return UnitPlan(tuple(p.members for p in plan.packs), lengths, plan)
    fingerprint = PlanFingerprint(
        jsonl_sha256=fingerprint_inputs[0],
        tokenizer_sha256=fingerprint_inputs[1],
        prompt_texts=(settings.prompt.system, settings.prompt.user),
        coord_mode=str(settings.coord_mode.value),
        field_order=str(settings.field_order.value),
        settings=packing,
        seed=settings.seed,
    )
    plan, reused = cached_or_planned(cache_text, fingerprint, lengths, locations=locations)
    return UnitPlan(tuple(p.members for p in plan.packs), lengths, plan, reused, fingerprint)


def plan_report(plan: PackPlan, sources: Sequence[SampleSource], *, reused: bool) -> dict[str, Any]:
    """The plan report of data.md §8.2.8: statistics plus the samples a drop-last plan left out."""
    stats = plan.stats()
    return {
        "schema_version": 1,
        "packs": stats.packs,
        "samples": stats.samples,
        "mean_fill": stats.mean_fill,
        "min_fill": stats.min_fill,
        "dropped_samples": stats.dropped_samples,
        "dropped": [sources[i].location for i in plan.dropped],
        "capacity": plan.capacity,
        "reused_cache": reused,
    }


def write_plan_files(
    run_dir: Path, plan: UnitPlan, sources: Sequence[SampleSource], store: ArtifactStore
) -> dict[str, Any] | None:
    """``pack_plan_cache.json`` (unless the plan came from it) and ``pack_plan.json``; returns the report,
    or None when the split is not packed."""
    if plan.plan is None:
        return None
    if not plan.reused_cache and plan.fingerprint is not None:
        store.write_text(run_dir / PLAN_CACHE_FILE, plan_cache_text(plan.plan, plan.fingerprint, plan.lengths))
    report = plan_report(plan.plan, sources, reused=plan.reused_cache)
    store.write_text(run_dir / PLAN_REPORT_FILE, json.dumps(report, indent=2) + "\n")
    return report


def read_plan_cache(run_dir: Path) -> str | None:
    """The run directory's plan cache text, if any (a resumed run reuses its plan)."""
    path = run_dir / PLAN_CACHE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None
