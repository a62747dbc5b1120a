"""Image files through Pillow: header reads, RGB decoding, the converter's resize-and-write, byte copies.

Rules from data.md §3.2, §9.3, §9.4: decoding never applies EXIF orientation (the converter already
wrote upright pixels); the converter applies it only under ``exif_orientation: apply``; written
images carry no orientation tag; resizing uses Lanczos; JPEG sources are written as JPEG with the
configured quality, everything else as PNG.
"""

from __future__ import annotations

import io
from pathlib import Path

import PIL
from PIL import Image, ImageOps, UnidentifiedImageError

from adapters.storage.atomic import copy_atomically, write_bytes_atomically
from domain.errors import ImageFileError
from domain.resize import ImageSize
from ports.storage import ImageFormat, ImageHeader, OrientationPolicy

EXIF_ORIENTATION_TAG = 0x0112

# Pillow raises these for files it cannot identify or decode (truncated data, bad markers, ...).
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except FileNotFoundError:
        raise ImageFileError(f"image file not found: {path}", path=str(path), kind="missing") from None
    except IsADirectoryError:
        raise ImageFileError(f"image path is a directory: {path}", path=str(path), kind="missing") from None
    except _DECODE_ERRORS as exc:
        raise ImageFileError(
            f"image file not decodable: {path} ({type(exc).__name__}: {exc})", path=str(path), kind="unreadable"
        ) from None


def _orientation(image: Image.Image) -> int | None:
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG)
    except _DECODE_ERRORS:
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class PillowImageStore:
    """:class:`ports.storage.ImageStore` with Pillow."""

    def read_header(self, path: Path) -> ImageHeader:
        with _open(path) as image:
            width, height = image.size
            if width <= 0 or height <= 0:
                raise ImageFileError(
                    f"image file has an empty size {width}x{height}: {path}", path=str(path), kind="unreadable"
                )
            return ImageHeader(ImageSize(width, height), str(image.format or ""), _orientation(image))

    def read_rgb(self, path: Path) -> Image.Image:
        with _open(path) as image:
            try:
                return image.convert("RGB")
            except _DECODE_ERRORS as exc:
                raise ImageFileError(
                    f"image file not decodable: {path} ({type(exc).__name__}: {exc})",
                    path=str(path),
                    kind="unreadable",
                ) from None

    def write_converted(
        self,
        source: Path,
        destination: Path,
        *,
        size: ImageSize,
        orientation: OrientationPolicy,
        image_format: ImageFormat,
        jpeg_quality: int,
    ) -> ImageSize:
        with _open(source) as image:
            try:
                oriented = ImageOps.exif_transpose(image) if orientation is OrientationPolicy.APPLY else image
                # RGB first: palette and 1-bit images cannot be resampled with Lanczos.
                rgb = oriented.convert("RGB")
            except _DECODE_ERRORS as exc:
                raise ImageFileError(
                    f"image file not decodable: {source} ({type(exc).__name__}: {exc})",
                    path=str(source),
                    kind="unreadable",
                ) from None
        if rgb.size != (size.width, size.height):
            rgb = rgb.resize((size.width, size.height), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        if image_format is ImageFormat.JPEG:
            # No exif/icc arguments: the written file carries no orientation tag (data.md §9.4).
            rgb.save(buffer, format="JPEG", quality=jpeg_quality)
        else:
            rgb.save(buffer, format="PNG")
        write_bytes_atomically(destination, buffer.getvalue())
        return ImageSize(*rgb.size)

    def library_versions(self) -> dict[str, str]:
        return {"Pillow": str(PIL.__version__)}

    def copy_bytes(self, source: Path, destination: Path) -> None:
        try:
            copy_atomically(source, destination)
        except FileNotFoundError:
            raise ImageFileError(f"image file not found: {source}", path=str(source), kind="missing") from None
