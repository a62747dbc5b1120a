"""Value objects shared by the data core: geometry kinds, field order, coord mode, detected objects."""

from __future__ import annotations

import enum

import attrs


class GeometryKind(str, enum.Enum):
    BBOX = "bbox_2d"
    POLY = "poly"


class FieldOrder(str, enum.Enum):
    DESC_FIRST = "desc_first"
    GEOMETRY_FIRST = "geometry_first"


class CoordMode(str, enum.Enum):
    TOKENS = "tokens"
    NUMERIC = "numeric"


class Ordering(str, enum.Enum):
    SORTED = "sorted"
    RANDOM = "random"


def _bins_tuple(values: object) -> tuple[int, ...]:
    return tuple(map(int, values))  # type: ignore[call-overload]


@attrs.frozen
class DetObject:
    """One object in bins (norm1000): a description plus exactly one flat geometry.

    ``bins`` is the flat coordinate list in stored order (even index x, odd index y); it is never
    re-paired, reordered or dropped by any helper.
    """

    desc: str
    kind: GeometryKind
    bins: tuple[int, ...] = attrs.field(converter=_bins_tuple)

    @property
    def is_bbox(self) -> bool:
        return self.kind is GeometryKind.BBOX
