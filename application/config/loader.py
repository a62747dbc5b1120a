"""Load a config: YAML files, ``extends``, deep merge, strict structuring, validation (D13).

Only YAML files are read here: nothing touches a model, a dataset image, a server or an output
directory (infer-eval-config.md §1.1.3). Problems are raised as :class:`domain.errors.ConfigError`:
all structural problems of one load together (sorted by dotted path), then all cross-field
problems together.
"""

from __future__ import annotations

import difflib
import enum
import math
import os
import re
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import attrs
import cattrs
import yaml
from cattrs.errors import (
    AttributeValidationNote,
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from application.config import schema
from application.config.keys import (
    ENTRY_POINTS,
    ConfigPath,
    EntryPoint,
    PathPart,
    format_path,
    is_under,
    path_sort_key,
    source_of,
)
from application.config.migrations import find_migration, normalize_path
from application.config.validation import inert_key_warnings, validation_problems
from domain.errors import ConfigError

# --------------------------------------------------------------------------------------------
# YAML: safe loading with YAML 1.2 core scalars, no duplicate or non-string keys
# --------------------------------------------------------------------------------------------

_BOOL_TAG = "tag:yaml.org,2002:bool"
_INT_TAG = "tag:yaml.org,2002:int"
_FLOAT_TAG = "tag:yaml.org,2002:float"
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ConfigYamlLoader(yaml.SafeLoader):
    """A safe loader with YAML 1.2 core scalars.

    PyYAML follows YAML 1.1: ``1e-4`` is a string, ``yes``/``on`` are booleans, ``1:30`` is 90 and
    ``2024-01-01`` is a date. Here booleans are only true/false, ``1e-4`` is a float, there are no
    sexagesimal numbers or timestamps, and a duplicate or non-string mapping key is an error.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                raise yaml.constructor.ConstructorError(
                    None, None, f"mapping key {key_node.value!r} is not a string", key_node.start_mark
                )
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key_node.value}'", key_node.start_mark
                )
            seen.add(key_node.value)
        self.flatten_mapping(node)
        mapping: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=deep)
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping


_ConfigYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in {_BOOL_TAG, _INT_TAG, _FLOAT_TAG, _TIMESTAMP_TAG}]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigYamlLoader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_ConfigYamlLoader.add_implicit_resolver(_INT_TAG, re.compile(r"^[-+]?[0-9]+$"), list("-+0123456789"))
_ConfigYamlLoader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _construct_bool(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> bool:
    return str(loader.construct_scalar(node)).lower() == "true"


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    return int(str(loader.construct_scalar(node)), 10)


def _construct_float(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float:
    text = str(loader.construct_scalar(node)).lower()
    if text.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if text == ".nan":
        return math.nan
    return float(text)


_ConfigYamlLoader.add_constructor(_BOOL_TAG, _construct_bool)
_ConfigYamlLoader.add_constructor(_INT_TAG, _construct_int)
_ConfigYamlLoader.add_constructor(_FLOAT_TAG, _construct_float)


def parse_yaml_text(text: str, file: Path) -> dict[str, Any]:
    """Parse one config file's text: the top level must be a mapping; an empty file is ``{}``."""
    try:
        data = yaml.load(text, Loader=_ConfigYamlLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(file)
        raise ConfigError(f"{where}: invalid YAML: {exc.problem or exc.context}") from exc
    except (yaml.YAMLError, ValueError) as exc:
        raise ConfigError(f"{file}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{file}: the top level of a config file must be a mapping of blocks, got {_describe(data)}"
        )
    return data


# --------------------------------------------------------------------------------------------
# extends + deep merge with per-leaf sources
# --------------------------------------------------------------------------------------------


@attrs.frozen
class _Layer:
    data: dict[str, Any]
    sources: dict[str, Path]
    chain: tuple[Path, ...]


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _leaf_sources(value: Any, prefix: str, file: Path) -> dict[str, Path]:
    if isinstance(value, dict) and value:
        out: dict[str, Path] = {}
        for key, item in value.items():
            out.update(_leaf_sources(item, _join(prefix, key), file))
        return out
    return {prefix: file}


def _merge(
    base: dict[str, Any], base_src: dict[str, Path], over: dict[str, Any], over_src: dict[str, Path], prefix: str = ""
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Deep-merge ``over`` onto ``base``: mappings merge, lists and scalars (and null) replace."""
    result = dict(base)
    sources = dict(base_src)
    for key, value in over.items():
        path = _join(prefix, key)
        if key in result and isinstance(result[key], dict) and isinstance(value, dict):
            sub_base_src = {k: v for k, v in sources.items() if is_under(k, path)}
            sub_over_src = {k: v for k, v in over_src.items() if is_under(k, path)}
            merged, merged_src = _merge(result[key], sub_base_src, value, sub_over_src, path)
            sources = {k: v for k, v in sources.items() if not is_under(k, path)}
            if merged:
                merged_src.pop(path, None)  # an empty mapping that became non-empty is no longer a leaf
            else:
                merged_src[path] = over_src.get(path) or base_src[path]
            sources.update(merged_src)
            result[key] = merged
        else:
            sources = {k: v for k, v in sources.items() if not is_under(k, path)}
            sources.update({k: v for k, v in over_src.items() if is_under(k, path)})
            result[key] = value
    return result, sources


def _display_chain(files: Sequence[Path]) -> str:
    common = Path(os.path.commonpath([str(f.parent) for f in files]))
    return " -> ".join(os.path.relpath(f, common) for f in files)


def _resolve_layer(file: Path, stack: tuple[Path, ...], referenced_from: Path | None) -> _Layer:
    file = file.resolve()
    if file in stack:
        raise ConfigError(
            f"Cyclic config inheritance detected at: {file} (chain: {_display_chain([*stack, file])})"
        )
    if file.is_dir():
        what = "config file" if referenced_from is None else f"extends target (referenced from {referenced_from})"
        raise ConfigError(f"{what} {file} is a directory, not a YAML file; give the path of the config file in it")
    if not file.is_file():
        if referenced_from is None:
            raise ConfigError(f"config file not found: {file}")
        raise ConfigError(f"extends target not found: {file} (referenced from {referenced_from})")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{file}: cannot read config file: {exc}") from exc
    data = parse_yaml_text(text, file)
    bases = _extends_list(data.pop("extends", None), file)
    merged: dict[str, Any] = {}
    sources: dict[str, Path] = {}
    chain: list[Path] = []
    for base in bases:
        base_path = Path(base)
        if not base_path.is_absolute():
            base_path = file.parent / base_path
        layer = _resolve_layer(base_path, (*stack, file), file)
        merged, sources = _merge(merged, sources, layer.data, layer.sources)
        chain.extend(p for p in layer.chain if p not in chain)
    own_sources = _leaf_sources(data, "", file) if data else {}
    merged, sources = _merge(merged, sources, data, own_sources)
    chain.append(file)
    return _Layer(merged, sources, tuple(chain))


def _extends_list(value: Any, file: Path) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return list(value)
    raise ConfigError(
        f"'extends' must be a path string or a list of path strings (from {file}), got {_describe(value)}"
    )


# --------------------------------------------------------------------------------------------
# The one cattrs converter: strict primitive hooks, forbid_extra_keys, detailed validation
# --------------------------------------------------------------------------------------------


class _Mismatch(Exception):
    """A value of the wrong type or outside an enumeration; the walker adds the dotted path."""

    def __init__(self, expected: str, value: Any, *, choices: bool = False) -> None:
        self.expected = expected
        self.value = value
        self.choices = choices
        super().__init__(expected)

    def text(self, path: str) -> str:
        got = repr(self.value) if self.choices and isinstance(self.value, str) else _describe(self.value)
        return f"'{path}' must be {self.expected}, got {got}"


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool {str(value).lower()}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return f"str {shown!r}"
    if isinstance(value, (int, float)):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return type(value).__name__


def _structure_int(value: Any, _: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Mismatch("an int", value)
    return value


def _structure_float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Mismatch("a number", value)
    if not math.isfinite(value):
        raise _Mismatch("a finite number", value)
    return float(value)


def _structure_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise _Mismatch("a bool (true or false)", value)
    return value


def _structure_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise _Mismatch("a string", value)
    return value


def _structure_path(value: Any, _: Any) -> Path:
    if not isinstance(value, str):
        raise _Mismatch("a path string", value)
    if not value.strip():
        raise _Mismatch("a non-empty path string", value)
    return Path(value)


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType) and type(None) in typing.get_args(tp)


def _is_literal(tp: Any) -> bool:
    return typing.get_origin(tp) is Literal


def _is_enum(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, enum.Enum)


def _is_homogeneous_tuple(tp: Any) -> bool:
    args = typing.get_args(tp)
    return typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis


def _renames(cl: type) -> dict[str, Any]:
    return {
        f.name: override(rename=schema.yaml_key(f))
        for f in attrs.fields(cl)
        if schema.yaml_key(f) != f.name
    }


def _build_converter() -> cattrs.Converter:
    converter = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)

    def optional_factory(tp: Any) -> Callable[[Any, Any], Any]:
        inner_types = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner_types) != 1:
            raise TypeError(f"unsupported union in the config schema: {tp}")
        inner = inner_types[0]
        inner_hook = converter.get_structure_hook(inner)

        def structure_optional(value: Any, _: Any) -> Any:
            if value is None:
                return None
            try:
                return inner_hook(value, inner)
            except _Mismatch as exc:
                raise _Mismatch(f"{exc.expected} or null", exc.value, choices=exc.choices) from None

        return structure_optional

    def literal_factory(tp: Any) -> Callable[[Any, Any], Any]:
        allowed = list(typing.get_args(tp))

        def structure_literal(value: Any, _: Any) -> Any:
            if isinstance(value, str) and value in allowed:
                return value
            raise _Mismatch(f"one of {allowed}", value, choices=True)

        return structure_literal

    def enum_factory(tp: Any) -> Callable[[Any, Any], Any]:
        allowed = [member.value for member in tp]

        def structure_enum(value: Any, _: Any) -> Any:
            if isinstance(value, str) and value in allowed:
                return tp(value)
            raise _Mismatch(f"one of {allowed}", value, choices=True)

        return structure_enum

    def tuple_factory(tp: Any) -> Callable[[Any, Any], Any]:
        item_type = typing.get_args(tp)[0]
        item_hook = converter.get_structure_hook(item_type)

        def structure_list(value: Any, _: Any) -> tuple[Any, ...]:
            if not isinstance(value, list):
                raise _Mismatch("a list", value)
            items: list[Any] = []
            errors: list[Exception] = []
            for index, item in enumerate(value):
                try:
                    items.append(item_hook(item, item_type))
                except Exception as exc:  # noqa: BLE001 - collected and re-raised as one group
                    exc.__notes__ = [
                        *getattr(exc, "__notes__", []),
                        IterableValidationNote(f"Structuring item @ index {index}", index, item_type),
                    ]
                    errors.append(exc)
            if errors:
                raise IterableValidationError(f"While structuring {tp!r}", errors, tp)
            return tuple(items)

        return structure_list

    def attrs_factory(cl: Any) -> Callable[[Any, Any], Any]:
        structure_fields = make_dict_structure_fn(cl, converter, **_renames(cl))

        def structure_block(value: Any, _: Any) -> Any:
            if not isinstance(value, dict):
                raise _Mismatch("a mapping", value)
            return structure_fields(value, cl)

        return structure_block

    def attrs_unstructure_factory(cl: Any) -> Callable[[Any], Any]:
        return make_dict_unstructure_fn(cl, converter, **_renames(cl))

    # Later registrations take precedence in cattrs' function dispatch: general first.
    converter.register_structure_hook_factory(attrs.has, attrs_factory)
    converter.register_structure_hook_factory(_is_homogeneous_tuple, tuple_factory)
    converter.register_structure_hook_factory(_is_enum, enum_factory)
    converter.register_structure_hook_factory(_is_literal, literal_factory)
    converter.register_structure_hook_factory(_is_optional, optional_factory)
    converter.register_structure_hook(int, _structure_int)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(bool, _structure_bool)
    converter.register_structure_hook(str, _structure_str)
    converter.register_structure_hook(Path, _structure_path)
    # cattrs tries singledispatch first, where a `str` hook would also catch str-based enums
    # (the domain's CoordMode etc.): register every schema enum by its exact class.
    for enum_type in _schema_enums(schema.CoordExpConfig):
        converter.register_structure_hook(enum_type, enum_factory(enum_type))
    converter.register_unstructure_hook_factory(attrs.has, attrs_unstructure_factory)
    converter.register_unstructure_hook(Path, lambda p: p.as_posix())
    converter.register_unstructure_hook_func(_is_enum, lambda e: e.value)
    return converter


def _schema_enums(cl: type, seen: set[type] | None = None) -> set[type]:
    seen = set() if seen is None else seen
    found: set[type] = set()
    if cl in seen:
        return found
    seen.add(cl)
    for field in attrs.fields(cl):
        stack = [field.type]
        while stack:
            tp = stack.pop()
            if _is_enum(tp):
                found.add(tp)
            elif attrs.has(tp):
                found |= _schema_enums(tp, seen)
            else:
                stack.extend(typing.get_args(tp))
    return found


CONVERTER: cattrs.Converter = _build_converter()
"""The project's one config converter (structure YAML data, unstructure to JSON-ready data)."""


# --------------------------------------------------------------------------------------------
# Schema index (for suggestions) and the structural error walker
# --------------------------------------------------------------------------------------------


def _block_class(tp: Any) -> tuple[type | None, bool]:
    """The attrs class reached through a field type (Optional / tuple unwrapped) and whether it is a list."""
    if _is_optional(tp):
        tp = next(a for a in typing.get_args(tp) if a is not type(None))
    if _is_homogeneous_tuple(tp):
        inner = typing.get_args(tp)[0]
        return (inner, True) if attrs.has(inner) else (None, True)
    return (tp, False) if attrs.has(tp) else (None, False)


def _schema_paths(cl: type, prefix: str = "") -> list[str]:
    out: list[str] = []
    for field in attrs.fields(cl):
        path = _join(prefix, schema.yaml_key(field))
        out.append(path)
        sub, is_list = _block_class(field.type)
        if sub is not None:
            out.extend(_schema_paths(sub, path + "[]" if is_list else path))
    return out


SCHEMA_PATHS: tuple[str, ...] = tuple(_schema_paths(schema.CoordExpConfig))
"""Every dotted key of the schema (list items written ``[]``), blocks included."""


def _lookup_raw(data: Any, parts: Sequence[PathPart]) -> Any:
    for part in parts:
        if isinstance(part, int) and isinstance(data, list) and part < len(data):
            data = data[part]
            continue
        if isinstance(part, str) and isinstance(data, dict) and part in data:
            data = data[part]
            continue
        return None
    return data


def _subtree_paths(value: Any, parts: ConfigPath) -> list[ConfigPath]:
    out = [parts]
    if isinstance(value, dict):
        for key, item in value.items():
            out.extend(_subtree_paths(item, (*parts, key)))
    return out


class _StructuralProblems:
    def __init__(self, raw: dict[str, Any], sources: Mapping[str, Path]) -> None:
        self.raw = raw
        self.sources = sources
        self.problems: list[tuple[ConfigPath, str]] = []

    def source_of(self, parts: Sequence[PathPart]) -> Path | None:
        return source_of(self.sources, format_path(parts))

    def _from(self, parts: Sequence[PathPart]) -> str:
        src = self.source_of(parts)
        return f" (from {src})" if src is not None else ""

    def add(self, parts: ConfigPath, message: str) -> None:
        self.problems.append((parts, message))

    def walk(self, exc: BaseException, parts: ConfigPath) -> None:
        if isinstance(exc, ClassValidationError):
            with_notes, without = exc.group_exceptions()
            for sub, note in with_notes:
                self.walk(sub, (*parts, _yaml_name(exc.cl, note.name)))
            for sub in without:
                self.walk(sub, parts)
        elif isinstance(exc, IterableValidationError):
            with_notes_it, without_it = exc.group_exceptions()
            for sub, it_note in with_notes_it:
                self.walk(sub, (*parts, it_note.index))
            for sub in without_it:
                self.walk(sub, parts)
        elif isinstance(exc, ForbiddenExtraKeysError):
            for key in sorted(exc.extra_fields):
                self.unknown_key((*parts, key), exc.cl)
        elif isinstance(exc, _Mismatch):
            self.add(parts, exc.text(format_path(parts)) + self._from(parts))
        elif isinstance(exc, KeyError) and any(
            isinstance(n, AttributeValidationNote) for n in getattr(exc, "__notes__", [])
        ):
            parent = parts[:-1]
            where = f" in the '{format_path(parent)}' block" if parent else ""
            self.add(parts, f"Missing required config key '{format_path(parts)}'{where}{self._from(parent)}")
        else:
            self.add(parts, f"'{format_path(parts) or '<root>'}': {type(exc).__name__}: {exc}{self._from(parts)}")

    def unknown_key(self, parts: ConfigPath, cl: type) -> None:
        path = format_path(parts)
        value = _lookup_raw(self.raw, parts)
        migrated: list[str] = []
        seen: set[int] = set()
        for sub in _subtree_paths(value, parts):
            migration = find_migration(format_path(sub))
            if migration is not None and id(migration) not in seen:
                seen.add(id(migration))
                migrated.append(migration.message(format_path(sub)) + self._from(sub))
        if migrated:
            for message in migrated:
                self.add(parts, message)
            return
        key = str(parts[-1])
        siblings = [schema.yaml_key(f) for f in attrs.fields(cl)]
        close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
        if len(parts) == 1:
            hint = f"; did you mean '{close[0]}'?" if close else ""
            allowed = list(schema.TOP_LEVEL_BLOCKS)
            self.add(parts, f"Unknown top-level config block '{key}'{self._from(parts)}{hint}; allowed blocks: {allowed}")
            return
        if close:
            suggestion = format_path((*parts[:-1], close[0]))
            self.add(parts, f"Unknown config key '{path}'{self._from(parts)}; did you mean '{suggestion}'?")
            return
        own = normalize_path(path)
        elsewhere = [p for p in SCHEMA_PATHS if p.rsplit(".", 1)[-1] == key and p != own]
        if elsewhere:
            shown = " or ".join(f"'{p}'" for p in sorted(elsewhere, key=lambda p: (p.count("."), p))[:3])
            self.add(parts, f"Unknown config key '{path}'{self._from(parts)}; did you mean {shown}?")
            return
        self.add(parts, f"Unknown config key '{path}'{self._from(parts)}; valid keys here: {sorted(siblings)}")


def _yaml_name(cl: type, attribute: str) -> str:
    for field in attrs.fields(cl):
        if field.name == attribute:
            return schema.yaml_key(field)
    return attribute


def structure_config(data: dict[str, Any], sources: Mapping[str, Path] | None = None) -> schema.CoordExpConfig:
    """Structure merged YAML data into the schema; every structural problem is reported at once."""
    sources = sources or {}
    try:
        return CONVERTER.structure(data, schema.CoordExpConfig)
    except Exception as exc:  # noqa: BLE001 - every structuring failure becomes one ConfigError
        collector = _StructuralProblems(data, sources)
        collector.walk(exc, ())
        problems = sorted(collector.problems, key=lambda item: (path_sort_key(item[0]), item[1]))
        raise ConfigError([message for _, message in problems]) from None


# --------------------------------------------------------------------------------------------
# Public entry
# --------------------------------------------------------------------------------------------


@attrs.frozen
class LoadedConfig:
    """A loaded, validated config: the root object plus where every leaf came from."""

    config: schema.CoordExpConfig
    path: Path
    sources: Mapping[str, Path]
    extends_chain: tuple[Path, ...]
    warnings: tuple[str, ...] = ()

    @property
    def path_abs(self) -> Path:
        return self.path.resolve()


def read_merged(path: str | Path) -> tuple[dict[str, Any], dict[str, Path], tuple[Path, ...]]:
    """Read a config file and its bases; return the merged data, per-leaf sources and the merge order."""
    layer = _resolve_layer(Path(path), (), None)
    return layer.data, layer.sources, layer.chain


def load_config(path: str | Path, *, entry_point: EntryPoint | None = None) -> LoadedConfig:
    """Load, merge, structure and validate a config file.

    With ``entry_point`` the blocks and keys that entry point needs are required too. Raises
    :class:`ConfigError` listing every problem.
    """
    if entry_point is not None and entry_point not in ENTRY_POINTS:
        raise ValueError(f"unknown entry point {entry_point!r}; known: {list(ENTRY_POINTS)}")
    data, sources, chain = read_merged(path)
    config = structure_config(data, sources)
    problems = validation_problems(config, sources, entry_point)
    if problems:
        raise ConfigError(problems)
    notes = tuple(inert_key_warnings(config))
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=2)
    return LoadedConfig(config=config, path=Path(path), sources=dict(sources), extends_chain=chain, warnings=notes)
