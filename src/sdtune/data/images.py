"""Safe image opening: one function that turns any image file a user may have into an RGB ``PIL.Image``, or raises
one error type whose message names the file and the reason.

What ``open_image`` handles, and why:

* EXIF orientation is applied (phone photos are stored sideways with an orientation tag; training on the stored
  pixels would teach the model sideways people).
* Modes: grayscale (``L``, ``1``), palette (``P``, with or without a transparent index), ``CMYK``, ``YCbCr``,
  16-bit grayscale (``I;16*`` and ``I``, scaled down from 0..65535 rather than clipped, which would turn them white),
  float (``F``) and anything with alpha (``LA``, ``RGBA``, ``PA``...) composited onto white, because the VAE
  sees only RGB and a transparent background is black in the stored colour channels of most files.
* Decompression bombs: a per-call pixel limit (``max_pixels``, default PIL's own 178,956,970) checked from the
  header before any pixel is decoded. PIL's global check is a warning up to twice its limit and an exception above;
  both become our ``ImageError``. The warning is silenced inside this module only (``warnings.catch_warnings``),
  so that a limit set per call is the one that applies.
* Corrupt, truncated, zero-byte, missing, unreadable and non-image files all raise ``ImageError``.

``ImageFile.LOAD_TRUNCATED_IMAGES`` is deliberately left alone (it is global state, and a truncated image is
half grey: better skipped and reported than trained on).
"""

from __future__ import annotations

import collections
import io
import logging
import struct
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sdtune.errors import SdtuneError

logger = logging.getLogger(__name__)

#: File name extensions treated as images (compared case-insensitively).
def _avif_readable() -> bool:
    from PIL import features

    return bool(features.check("avif"))  # Pillow >= 11.2 built with libavif; sd-scripts reads it via pillow_avif


IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp") + (
    (".avif",) if _avif_readable() else ())
#: Extensions of image files that sdtune does not read (sd-scripts' list is the one above). They are named, never
#: skipped without a word: ``list_images`` logs them with the fix.
OTHER_IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".gif", ".tif", ".tiff", ".jxl", ".heic", ".heif", ".avif", ".jfif", ".jp2", ".apng", ".psd", ".tga", ".ico",
    ".svg", ".dds", ".exr", ".qoi", ".pcx", ".ppm", ".pgm", ".pbm", ".raw", ".dng", ".cr2", ".nef", ".arw",
}) - frozenset(IMAGE_EXTENSIONS)

#: PIL's default ``Image.MAX_IMAGE_PIXELS``: about 13,400 x 13,400.
DEFAULT_MAX_PIXELS = 178_956_970

# EXIF orientation tag; values 5..8 mean the stored image is rotated by 90 degrees (width and height swapped).
_ORIENTATION_TAG = 0x0112
_ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})
# Exceptions PIL raises for broken files besides OSError (its plugins are not consistent about this).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, IndexError, TypeError, struct.error, EOFError,
                  Image.DecompressionBombError)


class ImageError(SdtuneError):
    """An image file could not be used. ``path`` is the file, ``reason`` the short cause (without the path)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """The image files in ``folder`` (sub-folders too when ``recursive``), sorted by path.

    Hidden files (names starting with ``.``: editor backups, our own temporary files) are not images. Image files
    of extensions sdtune does not read are named in a warning (``list_image_files`` returns them instead).
    """
    images, others = list_image_files(folder, recursive)
    if others:
        logger.warning("%s", other_images_message(others, folder))
    return images


def list_image_files(folder: str | Path, recursive: bool = False) -> tuple[list[Path], list[Path]]:
    """(images sdtune reads, image files of other extensions) in ``folder``, each sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SdtuneError(f"image folder {folder} does not exist or is not a folder; pass the folder of training "
                          "images")
    entries = _walk(folder) if recursive else list(folder.iterdir())
    candidates = [p for p in entries if not p.name.startswith(".") and p.is_file()]
    return (sorted(p for p in candidates if p.suffix.lower() in IMAGE_EXTENSIONS),
            sorted(p for p in candidates if p.suffix.lower() in OTHER_IMAGE_EXTENSIONS))


def _walk(folder: Path) -> list[Path]:
    """Every entry below ``folder``, symbolic links to folders followed once: a folder reached a second time (a
    link loop, or two links to one folder) is not listed again, and is named in a warning. ``Path.rglob`` before
    Python 3.13 skipped linked folders without a word (issue 12 item 7)."""
    seen: dict[tuple[int, int], Path] = {}
    out: list[Path] = []
    skipped: list[tuple[Path, Path]] = []
    # folders reached without a link first, so that a folder linked from elsewhere keeps its own path
    pending: collections.deque[Path] = collections.deque([folder])
    links: collections.deque[Path] = collections.deque()
    while pending or links:
        current = pending.popleft() if pending else links.popleft()
        try:
            info = current.stat()
            entries = sorted(current.iterdir())
        except OSError as exc:
            logger.warning("%s: cannot be listed (%s); its images are left out", current, exc.strerror or exc)
            continue
        key = (info.st_dev, info.st_ino)
        if key in seen:
            skipped.append((current, seen[key]))
            continue
        seen[key] = current
        for entry in entries:
            out.append(entry)
            if entry.is_dir():  # follows a link
                (links if entry.is_symlink() else pending).append(entry)
    for link, first in skipped:
        logger.warning("%s: the folder %s is listed already (as %s); a symbolic link leads to it again, so its "
                       "images are taken once", link, first.resolve(), first)
    return out


def other_images_message(others: list[Path], folder: str | Path, limit: int = 20) -> str:
    """The message naming image files of extensions sdtune does not read (at most ``limit`` of them) and
    the fix."""
    shown = ", ".join(str(p) for p in others[:limit]) + (f" (and {len(others) - limit} more)"
                                                          if len(others) > limit else "")
    return (f"{len(others)} image file(s) in {folder} have an extension sdtune does not read (it reads "
            f"{' '.join(IMAGE_EXTENSIONS)}) and were left out: {shown}. Convert them to PNG, JPEG or WebP to use them.")


def _open_checked(path: Path, max_pixels: int, data: bytes | None = None) -> Image.Image:
    """``Image.open`` (header only) with our checks; the caller closes the returned image."""
    if data is None:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageError(path, "file does not exist") from None
        except OSError as exc:
            raise ImageError(path, f"cannot be read ({exc.strerror or exc})") from None
    else:
        size = len(data)
    if size == 0:
        raise ImageError(path, "empty file (0 bytes); delete it or copy the image again")
    try:
        with warnings.catch_warnings():
            # Our own limit below replaces PIL's warning; its hard error (twice its limit) is still caught.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path if data is None else io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file PIL can read (corrupt, or not an image despite its extension)") \
            from None
    except Image.DecompressionBombError as exc:
        raise ImageError(path, f"too many pixels, refused as a possible decompression bomb ({exc})") from None
    except PermissionError:
        raise ImageError(path, "permission denied; check the file's permissions") from None
    except _DECODE_ERRORS as exc:
        raise ImageError(path, _decode_reason(exc)) from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise ImageError(path, f"{width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,}, "
                               "refused as a possible decompression bomb; resize it or raise the pixel limit")
    if width <= 0 or height <= 0:
        im.close()
        raise ImageError(path, f"image has no pixels ({width}x{height})")
    return im


def _decode_reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if "truncated" in text.lower():
        return f"truncated file ({text}); copy the image again"
    return f"corrupt image data ({type(exc).__name__}: {text})"


def _exif_orientation(im: Image.Image, header_only: bool = False) -> int:
    try:
        if header_only and im.format == "PNG":
            # PIL's PNG getexif() decodes the whole image to look for an eXIf chunk after the pixel data; the PNG
            # spec puts it before, where it is already in `info`.
            data = im.info.get("exif")
            if not data:
                return 1
            exif = Image.Exif()
            exif.load(data)
            return int(exif.get(_ORIENTATION_TAG, 1) or 1)
        return int(im.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except _DECODE_ERRORS:
        # A broken EXIF block says nothing reliable about orientation; the pixels themselves are still usable.
        return 1


def image_size(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` as ``open_image`` would return it (EXIF orientation applied), read from the header only.

    Raises ``ImageError`` for files ``open_image`` would refuse at the header stage (missing, empty, not an image,
    too many pixels); a file whose pixel data is truncated is only found by ``open_image``.
    """
    path = Path(path)
    with _open_checked(path, max_pixels) as im:
        width, height = im.size
        if _exif_orientation(im, header_only=True) in (5, 6, 7, 8):
            width, height = height, width
    return width, height


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P" or mode == "PA":
        # A palette with a transparent index becomes RGBA and is composited like any image with alpha.
        im = im.convert("RGBA") if (mode == "PA" or "transparency" in im.info) else im.convert("RGB")
        mode = im.mode
        if mode == "RGB":
            return im
    if mode in _ALPHA_MODES:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (PNG opens as I;16 or I): scale 0..65535 to 0..255. PIL's own convert clips at 255.
        arr = np.asarray(im, dtype=np.float64)
        arr = np.clip(arr, 0, 65535) / 257.0
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        # Float images are either 0..1 (scientific tools) or 0..255; treat them by their range.
        scale = 255.0 if np.nanmax(arr, initial=0.0) <= 1.0 else 1.0
        arr = np.clip(np.nan_to_num(arr) * scale, 0, 255)
        return Image.fromarray(np.round(arr).astype(np.uint8), mode="L").convert("RGB")
    # L, 1, CMYK, YCbCr, LAB, HSV: PIL's conversion is right (CMYK JPEGs from Adobe are un-inverted on decode).
    return im.convert("RGB")


def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image with EXIF orientation applied and transparency composited onto white.

    Raises ``ImageError`` (naming the file and the reason) for missing, empty, corrupt, truncated and non-image
    files, and for images of more than ``max_pixels`` pixels (checked before decoding). ``data``, when given, is
    the file's content already read (``prepare`` hashes it too); ``path`` then only names the file in errors.
    """
    return _open(Path(path), max_pixels, data, alpha=False)[0]


def open_image_and_alpha(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None
                         ) -> tuple[Image.Image, Image.Image | None]:
    """``open_image``'s RGB image, and the image's alpha channel as an 8-bit ``L`` image of the same size and
    orientation (None when the file has no transparency: no alpha channel, and no transparent palette index).
    ``prepare --alpha_mask`` takes the alpha as the image's loss mask."""
    return _open(Path(path), max_pixels, data, alpha=True)


def _alpha_of(im: Image.Image) -> Image.Image | None:
    if im.mode in _ALPHA_MODES or (im.mode == "P" and "transparency" in im.info):
        return im.convert("RGBA").getchannel("A")
    return None


def _open(path: Path, max_pixels: int, data: bytes | None, alpha: bool) -> tuple[Image.Image, Image.Image | None]:
    with _open_checked(path, max_pixels, data) as im:
        try:
            im.load()
            orientation = _exif_orientation(im)
            oriented = ImageOps.exif_transpose(im) if orientation != 1 else im
            rgb = _to_rgb(oriented)
            channel = _alpha_of(oriented) if alpha else None  # convert() makes a new image: detached from the file
            # Detach from the file: `_to_rgb` may return the opened image itself, which `with` closes.
            return (rgb.copy() if rgb is im else rgb), channel
        except _DECODE_ERRORS as exc:
            raise ImageError(path, _decode_reason(exc)) from None
