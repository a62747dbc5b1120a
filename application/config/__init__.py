"""Configuration: YAML files with ``extends``, a strict typed schema, migrations and the resolved config (D13).

Public API (every entry point uses exactly these):
- ``load_config(path, *, entry_point=None) -> LoadedConfig`` (``.config``, ``.path``, ``.sources``,
  ``.extends_chain``, ``.warnings``);
- ``resolved_dict``, ``resolved_sha256``, ``redact``, ``write_resolved_config``, ``load_resolved_config``;
- ``check_local_paths`` (existence of configured inputs, called by entry points after loading);
- every problem raises ``domain.errors.ConfigError``.
"""

from application.config.keys import ENTRY_POINTS, EntryPoint, format_path
from application.config.loader import (
    CONVERTER,
    LoadedConfig,
    load_config,
    read_merged,
    structure_config,
)
from application.config.migrations import KEY_MIGRATIONS, KeyMigration, find_migration
from application.config.resolved import (
    RESOLVED_CONFIG_FILENAME,
    canonical_json,
    is_secret_key,
    load_resolved_config,
    redact,
    resolved_dict,
    resolved_document,
    resolved_sha256,
    write_json_atomic,
    write_resolved_config,
)
from application.config.schema import CoordExpConfig
from application.config.validation import (
    check_local_paths,
    config_problems,
    entry_point_problems,
    inert_key_warnings,
    validation_problems,
)
from domain.errors import ConfigError

__all__ = [
    "CONVERTER",
    "ENTRY_POINTS",
    "KEY_MIGRATIONS",
    "RESOLVED_CONFIG_FILENAME",
    "ConfigError",
    "CoordExpConfig",
    "EntryPoint",
    "KeyMigration",
    "LoadedConfig",
    "canonical_json",
    "check_local_paths",
    "config_problems",
    "entry_point_problems",
    "find_migration",
    "format_path",
    "inert_key_warnings",
    "is_secret_key",
    "load_config",
    "load_resolved_config",
    "read_merged",
    "redact",
    "resolved_dict",
    "resolved_document",
    "resolved_sha256",
    "structure_config",
    "validation_problems",
    "write_json_atomic",
    "write_resolved_config",
]
