"""The resolved config: JSON form, canonical hash, redaction, ``resolved_config.json`` (§1.5, §3.4, §7.1).

The resolved config is the merged, structured, default-filled schema object unstructured into
JSON (paths as strings, null kept). Its SHA-256 is taken over canonical JSON (sorted keys,
separators ``(",", ":")``, ``ensure_ascii=False``, UTF-8) before redaction; every written copy is
redacted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from application.config import schema
from application.config.loader import CONVERTER, LoadedConfig
from domain.errors import ArtifactError
from ports.storage import ArtifactStore

RESOLVED_CONFIG_FILENAME = "resolved_config.json"
RESOLVED_SCHEMA_VERSION = 1
REDACTED = "<REDACTED>"

SECRET_KEYS = frozenset({"access_token", "hf_token", "huggingface_token", "token", "password", "secret", "api_key"})
SECRET_SUFFIXES = ("_token", "_password", "_secret", "_api_key")

RESOLVED_KINDS = frozenset(
    {"train", "infer_pipeline", "evaluate", "visualize", "prepare_data", "expand_vocab", "merge_adapter",
     "stage2_server_launch"}
)
IMAGE_ROOT_SOURCES = frozenset({"config", "val_jsonl_dir", "producer", "artifact_dir"})


def _root(cfg: schema.CoordExpConfig | LoadedConfig) -> schema.CoordExpConfig:
    return cfg.config if isinstance(cfg, LoadedConfig) else cfg


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return value.as_posix()
    return value


def resolved_dict(cfg: schema.CoordExpConfig | LoadedConfig) -> dict[str, Any]:
    """The resolved config as plain JSON data (not redacted)."""
    data = _jsonable(CONVERTER.unstructure(_root(cfg)))
    assert isinstance(data, dict)
    return data


def canonical_json(data: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no whitespace, UTF-8 without ASCII escaping."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def resolved_sha256(cfg: schema.CoordExpConfig | LoadedConfig) -> str:
    """``resolved_config_sha256``: independent of key order, comments and the split over ``extends`` files."""
    return hashlib.sha256(canonical_json(resolved_dict(cfg))).hexdigest()


def is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return lowered in SECRET_KEYS or lowered.endswith(SECRET_SUFFIXES)


def redact(obj: Any) -> Any:
    """A copy of ``obj`` with the value of every secret-named key replaced by ``"<REDACTED>"``.

    Recursive through mappings and lists. A key is secret when, lowercased, it is one of
    ``SECRET_KEYS`` or ends with one of ``SECRET_SUFFIXES`` (a suffix rule, not a substring rule:
    ``tokens_total`` is kept).
    """
    if isinstance(obj, Mapping):
        return {k: (REDACTED if isinstance(k, str) and is_secret_key(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj


def write_json_atomic(path: Path, document: Any, store: ArtifactStore) -> None:
    """Write JSON (indent 2, ``ensure_ascii=False``, trailing newline) through ``store``'s atomic writer."""
    text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    # the one atomic writer: temp file, fsync, rename, and the umask's mode rather than mkstemp's 0600
    store.write_text(Path(path), text)


def resolved_document(
    cfg: schema.CoordExpConfig | LoadedConfig, kind: str, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The ``resolved_config.json`` document (redacted), without writing it."""
    if kind not in RESOLVED_KINDS:
        raise ValueError(f"unknown resolved_config kind {kind!r}; known: {sorted(RESOLVED_KINDS)}")
    document: dict[str, Any] = {"schema_version": RESOLVED_SCHEMA_VERSION, "kind": kind}
    if isinstance(cfg, LoadedConfig):
        document["config_path"] = str(cfg.path)
        document["config_path_abs"] = str(cfg.path_abs)
        document["extends_chain"] = [str(p) for p in cfg.extends_chain]
    document["resolved_config_sha256"] = resolved_sha256(cfg)
    reserved = {"schema_version", "kind", "resolved_config_sha256", "resolved"}
    for key, value in (extra or {}).items():
        if key in reserved:
            raise ValueError(f"extra key {key!r} would overwrite a field of resolved_config.json")
        document[key] = _jsonable(value)
    document["resolved"] = resolved_dict(cfg)
    redacted = redact(document)
    assert isinstance(redacted, dict)
    return redacted


def write_resolved_config(
    cfg: schema.CoordExpConfig | LoadedConfig,
    run_dir: str | Path,
    kind: str,
    extra: Mapping[str, Any] | None = None,
    *,
    store: ArtifactStore,
) -> Path:
    """Write ``<run_dir>/resolved_config.json`` atomically (through ``store``) and return its path.

    ``kind`` is e.g. ``"train"`` or ``"infer_pipeline"``. Given a :class:`LoadedConfig`, the
    document carries ``config_path``, ``config_path_abs`` and ``extends_chain``; ``extra`` adds
    entry-point fields (e.g. ``infer_fingerprint``, ``image_root``, ``stages``, ``artifacts``).
    """
    path = Path(run_dir) / RESOLVED_CONFIG_FILENAME
    write_json_atomic(path, resolved_document(cfg, kind, extra), store)
    return path


def load_resolved_config(path: str | Path) -> dict[str, Any]:
    """Read an inference run's ``resolved_config.json`` for eval/vis discovery (infer-eval-config.md §3.4).

    Rejects, in this order: unreadable or non-JSON text; a non-object; ``schema_version`` not an int;
    a version other than 1; ``kind`` not ``infer_pipeline``; missing ``stages.infer/eval/vis``;
    missing ``artifacts.run_dir``; an unknown ``image_root_source``. ``resolved`` stays opaque.
    """
    file = Path(path)
    try:
        document = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{file}: cannot read resolved_config.json: {exc}") from exc
    if not isinstance(document, dict):
        raise ArtifactError(f"{file}: resolved_config.json must be a JSON object")
    version = document.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise ArtifactError(f"{file}: schema_version must be an int, got {version!r}")
    if version != RESOLVED_SCHEMA_VERSION:
        raise ArtifactError(f"{file}: Unsupported resolved_config schema_version: {version}")
    if document.get("kind") != "infer_pipeline":
        raise ArtifactError(f"{file}: kind must be 'infer_pipeline', got {document.get('kind')!r}")
    stages = document.get("stages")
    if not isinstance(stages, dict) or any(k not in stages for k in ("infer", "eval", "vis")):
        raise ArtifactError(f"{file}: stages must have the keys infer, eval and vis")
    artifacts = document.get("artifacts")
    if not isinstance(artifacts, dict) or "run_dir" not in artifacts:
        raise ArtifactError(f"{file}: artifacts.run_dir is missing")
    source = document.get("image_root_source")
    if source not in IMAGE_ROOT_SOURCES:
        raise ArtifactError(
            f"{file}: unknown image_root_source {source!r}; known: {sorted(IMAGE_ROOT_SOURCES)}"
        )
    return document


__all__ = [
    "RESOLVED_CONFIG_FILENAME",
    "canonical_json",
    "is_secret_key",
    "load_resolved_config",
    "redact",
    "resolved_dict",
    "resolved_document",
    "resolved_sha256",
    "write_json_atomic",
    "write_resolved_config",
]
