"""Robust image loading for the library, the CLI and the app.

Everything a user can hand us goes through :func:`load_image` (files, bytes, PIL images, numpy
arrays) and comes out as an 8-bit RGB ``PIL.Image.Image`` the model can take, or raises
:class:`ImageError` whose message names the problem in plain words ("truncated JPEG", "not an
image: the file looks like HTML", "image is 20000×20000 = 400 MP, above the 40 MP limit").

Policy (documented in docs/reliability.md):

* **Never fetches URLs.** A string that looks like a URL (``http://``, ``data:``, ``s3://`` ...)
  is refused: "URLs are not fetched; upload the file".
* **Bounded before decoding.** The byte size is checked before reading (``max_bytes``), and the
  pixel count is read lazily from the header and checked against ``max_pixels`` before any pixel
  is decoded. PIL's own ``DecompressionBombError`` (above 2x ``Image.MAX_IMAGE_PIXELS``, raised
  while opening) is turned into the same message.
* **Allow-listed decoders.** Only common raster formats are decoded (:data:`ALLOWED_FORMATS`);
  anything else Pillow could open (EPS, which would run Ghostscript, PSD, ...) is refused by name.
  SVG (vector) and HEIC/HEIF (no decoder installed) are recognised by sniffing and refused with a
  clear message.
* **Fully decoded.** ``Image.load()`` is forced so truncated files fail here, not inside the model.
* **The right pixels.** EXIF orientation is applied (``ImageOps.exif_transpose``); the first frame
  of animations is used; transparency is composited over **white**; 16-bit images (``I;16``
  PNG/TIFF, 32-bit ``I``) are scaled to 8 bits by ``round(v / 257)`` (not clipped as Pillow's
  ``convert("L")`` does; 16-bit RGB(A) PNGs arrive as their high byte from Pillow's decoder, within
  1 of that); CMYK is converted through its embedded ICC profile when there is one;
  float (``F``) images in [0, 1] are scaled by 255, others clipped to [0, 255].
* **Sane geometry.** The shorter side must be at least :data:`MIN_SIDE` (8) pixels and the aspect
  ratio (long / short side) at most :data:`MAX_ASPECT` (50:1). Resizing the shorter side of a
  10000×8 strip to 224 px would otherwise build a 280000×224 image.

Notes on what was done to an image (e.g. "alpha composited over white") are stored in
``image.info["plugconv.notes"]`` (a list of strings) so a UI can show them.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "MAX_ASPECT",
    "MIN_SIDE",
    "NOTES_KEY",
    "ImageError",
    "image_from_array",
    "load_image",
    "sniff",
]

DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_BYTES = 50_000_000
MIN_SIDE = 8
MAX_ASPECT = 50.0
NOTES_KEY = "plugconv.notes"

#: Pillow format ids we decode. Everything else is refused by name, before decoding.
#: ("HEIF" is only registered when the optional pillow-heif plugin is installed; it is not by default.)
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "PPM", "HEIF")

_URL_RE = re.compile(r"^\s*([a-zA-Z][a-zA-Z0-9+.\-]{1,15}://|data:|www\.)")
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"heif"}
_HTML_RE = re.compile(rb"<\s*(!doctype\s+html|html|head|body|script|meta|title|div|p)[\s>]", re.IGNORECASE)
_SVG_RE = re.compile(rb"<\s*svg[\s>]", re.IGNORECASE)


class ImageError(ValueError):
    """An input that cannot be used as an image; the message names the problem in plain words."""


# --------------------------------------------------------------------------------------------------
# sniffing


def sniff(head: bytes) -> str | None:
    """Recognise content that is not a decodable raster image from its first bytes.

    Args:
        head: the first bytes of the file (1-4 KiB is plenty).

    Returns:
        A plain-words reason ("SVG is a vector format; ...") when the content is known not to be
        decodable, else ``None`` (let Pillow try).
    """
    if not head:
        return "empty file (0 bytes)"
    if head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS and "HEIF" not in _formats():
        return "unsupported format: HEIC/HEIF (no HEIF decoder installed); convert it to JPEG or PNG"
    if head.startswith(b"%PDF"):
        return "not an image: the file is a PDF document"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<"):
        if _SVG_RE.search(head):
            return "SVG is a vector format; upload a PNG/JPEG/WebP"
        if _HTML_RE.search(head[:4096]):
            return "not an image: the file looks like HTML"
        if text.startswith(b"<?xml"):
            return "not an image: the file looks like XML text"
    return None


def _looks_like_text(head: bytes) -> bool:
    if b"\x00" in head[:1024]:
        return False
    try:
        sample = head[:1024].decode("utf-8")
    except UnicodeDecodeError:
        # a multi-byte sequence may be cut at the end of the sample
        try:
            sample = head[:1020].decode("utf-8")
        except UnicodeDecodeError:
            return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in sample)
    return printable >= 0.95 * max(len(sample), 1)


def _formats() -> list[str]:
    """The allow-listed formats this Pillow build can open (plugins registered by Image.init())."""
    Image.init()
    return [f for f in ALLOWED_FORMATS if f in Image.OPEN]


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header only, via the allow-listed plugins (no bomb check)."""
    prefix = data[:16]
    for fmt in _formats():
        factory, accept = Image.OPEN[fmt]
        try:
            if accept and not accept(prefix):
                continue
            im = factory(io.BytesIO(data), "")
            size = im.size
            im.close()
            return size
        except Exception:  # noqa: BLE001 - any plugin failure just means "unknown"
            continue
    return None


def _mp(pixels: int) -> str:
    mp = pixels / 1e6
    return f"{mp:.0f} MP" if mp >= 10 else f"{mp:.1f} MP"


def _too_many_pixels(w: int, h: int, max_pixels: int) -> ImageError:
    return ImageError(
        f"image is {w}×{h} = {_mp(w * h)}, above the {_mp(max_pixels)} limit; downscale it before uploading"
    )


def _check_geometry(w: int, h: int, *, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise _too_many_pixels(w, h, max_pixels)
    if min(w, h) < MIN_SIDE:
        raise ImageError(f"image is {w}×{h} px; the shorter side must be at least {MIN_SIDE} px")
    aspect = max(w, h) / min(w, h)
    if aspect > MAX_ASPECT:
        raise ImageError(
            f"image is {w}×{h} px, an aspect ratio of {aspect:.0f}:1; at most {MAX_ASPECT:.0f}:1 is accepted "
            "(crop it first)"
        )


# --------------------------------------------------------------------------------------------------
# conversion to 8-bit RGB


def _white_composite(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _has_alpha(im: Image.Image) -> bool:
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return True
    return im.mode in ("P", "L", "RGB") and "transparency" in im.info


def _to_rgb(im: Image.Image, notes: list[str]) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB with the right pixel values (see module docstring)."""
    mode = im.mode
    if mode == "RGB":
        if "transparency" in im.info:
            notes.append("transparency composited over white")
            return _white_composite(im)
        return im
    if _has_alpha(im):
        if mode in ("RGBA", "LA") and im.getextrema()[-1][0] == 255:  # alpha channel fully opaque
            return im.convert("RGB")
        notes.append("transparency composited over white")
        return _white_composite(im)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im).astype(np.float64)
        if mode == "I" and arr.size and (arr.min() < 0 or arr.max() > 65535):
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / max(hi - lo, 1.0) * 255.0
            notes.append(f"32-bit integer image rescaled from [{lo:g}, {hi:g}] to 8 bits")
        elif mode == "I" and arr.size and arr.max() <= 255:
            pass  # already 8-bit values stored as 32-bit ints
        else:
            arr = arr / 257.0
            notes.append("16-bit image scaled to 8 bits")
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageError("float image contains NaN or infinite values")
        if arr.size and arr.min() >= 0 and arr.max() <= 1:
            arr = arr * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "CMYK":
        icc = im.info.get("icc_profile")
        if icc:
            try:
                out = ImageCms.profileToProfile(
                    im, ImageCms.ImageCmsProfile(io.BytesIO(icc)), ImageCms.createProfile("sRGB"), outputMode="RGB"
                )
                if out is not None:
                    notes.append("CMYK converted to sRGB with its ICC profile")
                    return out
            except (ImageCms.PyCMSError, OSError, ValueError):
                pass
        notes.append("CMYK converted to RGB without colour management")
        return im.convert("RGB")
    try:
        return im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(f"unsupported pixel mode {mode!r}: {exc}") from exc


def _finish(im: Image.Image, notes: list[str], *, max_pixels: int) -> Image.Image:
    """Mode conversion, EXIF orientation, geometry checks; returns a fresh, loaded RGB image."""
    try:
        orient = im.getexif().get(0x0112)
        transposed = ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the stored orientation
        notes.append("EXIF orientation unreadable; image used as stored")
        orient, transposed = None, None
    if transposed is not None:
        if orient and orient != 1:
            notes.append(f"EXIF orientation {orient} applied")
        im = transposed
    rgb = _to_rgb(im, notes)
    if rgb is im:
        rgb = im.copy()
    rgb.info = {NOTES_KEY: list(notes)}
    _check_geometry(*rgb.size, max_pixels=max_pixels)
    return rgb


# --------------------------------------------------------------------------------------------------
# public API


def image_from_array(arr: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A numpy array (e.g. from ``gr.Image(type="numpy")``) -> 8-bit RGB PIL image.

    Args:
        arr: H×W (gray), H×W×1, H×W×3 (RGB) or H×W×4 (RGBA, composited over white). dtypes:
            ``uint8`` as is; ``bool`` (False/True -> 0/255); ``uint16`` scaled by 1/257; other
            integer arrays must lie in [0, 255]; float arrays in [0, 1] (scaled by 255) or
            [0, 255], finite.
        max_pixels: refuse larger images.

    Returns:
        An RGB ``PIL.Image.Image``.

    Raises:
        ImageError: wrong type, shape, dtype or value range; too large; bad geometry.
    """
    if not isinstance(arr, np.ndarray):
        raise ImageError(f"expected a numpy array, got {type(arr).__name__}")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        raise ImageError(
            f"array of shape {tuple(arr.shape)} looks channel-first (C×H×W); pass H×W×C (e.g. arr.transpose(1, 2, 0))"
        )
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise ImageError(f"array of shape {tuple(arr.shape)} is not an image; expected H×W, H×W×3 or H×W×4")
    h, w = arr.shape[:2]
    if h * w == 0:
        raise ImageError(f"array of shape {tuple(arr.shape)} is empty")
    if h * w > max_pixels:
        raise _too_many_pixels(w, h, max_pixels)
    notes: list[str] = []
    if arr.dtype == np.uint8:
        a8 = arr
    elif arr.dtype == np.bool_:
        a8 = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint16:
        a8 = np.rint(arr / 257.0).astype(np.uint8)
        notes.append("16-bit array scaled to 8 bits")
    elif np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise ImageError(f"integer array values must lie in [0, 255] (or use uint16); got [{lo}, {hi}]")
        a8 = arr.astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ImageError("float array contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo >= 0 and hi <= 1:
            a8 = np.rint(arr * 255.0).astype(np.uint8)
        elif lo >= 0 and hi <= 255:
            a8 = np.rint(arr).astype(np.uint8)
        else:
            raise ImageError(f"float array values must lie in [0, 1] or [0, 255]; got [{lo:g}, {hi:g}]")
    else:
        raise ImageError(f"unsupported array dtype {arr.dtype}; use uint8, uint16, bool or float")
    im = Image.fromarray(np.ascontiguousarray(a8))
    return _finish(im, notes, max_pixels=max_pixels)


def _read_source(src: str | Path | bytes | bytearray | memoryview, max_bytes: int) -> tuple[bytes, str]:
    """Bytes of the source and a short name for messages; refuses URLs, missing and huge files."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
        if len(data) > max_bytes:
            raise ImageError(f"image data is {len(data) / 1e6:.1f} MB, above the {max_bytes / 1e6:.0f} MB limit")
        return data, "image data"
    if isinstance(src, str):
        if _URL_RE.match(src):
            raise ImageError("URLs are not fetched; upload the file")
        if not src.strip():
            raise ImageError("no image given (empty path)")
        if "\x00" in src:
            raise ImageError("invalid file name (contains a NUL character)")
    path = Path(src)
    name = path.name or str(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(f"file not found: {name}") from None
    except OSError as exc:
        raise ImageError(f"cannot read {name}: {exc.strerror or exc}") from None
    if path.is_dir():
        raise ImageError(f"{name} is a folder, not an image file")
    if st.st_size > max_bytes:
        raise ImageError(f"{name} is {st.st_size / 1e6:.1f} MB, above the {max_bytes / 1e6:.0f} MB limit")
    try:
        with path.open("rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"cannot read {name}: {exc.strerror or exc}") from None
    if len(data) > max_bytes:  # grew while we read it, or a special file
        raise ImageError(f"{name} is above the {max_bytes / 1e6:.0f} MB limit")
    return data, name


def _open_bytes(data: bytes, name: str, *, max_pixels: int) -> Image.Image:
    reason = sniff(data[:4096])
    if reason:
        raise ImageError(f"{name}: {reason}" if name != "image data" else reason)
    prefix = f"{name}: " if name != "image data" else ""
    try:
        im = Image.open(io.BytesIO(data), formats=_formats())
    except Image.DecompressionBombError as exc:
        size = _header_size(data)
        if size:
            raise ImageError(prefix + str(_too_many_pixels(*size, max_pixels))) from None
        m = re.search(r"\((\d+) pixels\)", str(exc))
        px = int(m.group(1)) if m else 0
        raise ImageError(f"{prefix}image has {_mp(px)}, above the {_mp(max_pixels)} limit") from None
    except UnidentifiedImageError:
        other = None
        try:  # name a format Pillow knows but we do not decode (header parse only, nothing decoded)
            with Image.open(io.BytesIO(data)) as probe:
                other = probe.format
        except Exception:  # noqa: BLE001
            other = None
        if other:
            raise ImageError(f"{prefix}unsupported format: {other}; upload a PNG/JPEG/WebP") from None
        if _looks_like_text(data):
            raise ImageError(f"{prefix}not an image: the file looks like text") from None
        raise ImageError(f"{prefix}not an image: unrecognised or corrupt file (starts with {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError) as exc:  # header present but broken
        raise ImageError(f"{prefix}corrupt image header: {exc}") from None
    fmt = im.format or "image"
    w, h = im.size
    if w * h > max_pixels:  # refuse before decoding a single pixel
        im.close()
        raise ImageError(prefix + str(_too_many_pixels(w, h, max_pixels)))
    notes: list[str] = []
    n_frames = getattr(im, "n_frames", 1)
    if n_frames > 1:
        im.seek(0)
        if fmt != "MPO":  # phone JPEGs: frame 0 is the photo, the others are previews/depth maps
            noun = "pages" if fmt == "TIFF" else "frames"
            notes.append(f"first of {n_frames} {noun} used")
    try:
        im.load()
    except Image.DecompressionBombError:
        raise ImageError(prefix + str(_too_many_pixels(w, h, max_pixels))) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
        msg = str(exc) or type(exc).__name__
        truncated = "truncat" in msg.lower() or isinstance(exc, EOFError)
        raise ImageError(f"{prefix}{'truncated' if truncated else 'corrupt'} {fmt} file ({msg})") from None
    try:
        return _finish(im, notes, max_pixels=max_pixels)
    except ImageError as exc:
        raise ImageError(prefix + str(exc)) from None


def load_image(
    src: str | Path | bytes | Image.Image | np.ndarray,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Load anything a user can give us as an 8-bit RGB image, or explain why not.

    Args:
        src: a file path (``str``/``Path``; URLs are refused, never fetched), the file's bytes, a
            ``PIL.Image.Image`` (converted like a file) or a numpy array (see :func:`image_from_array`).
        max_pixels: refuse images with more pixels (checked from the header, before decoding).
        max_bytes: refuse files larger than this (checked before reading).

    Returns:
        A fully loaded RGB ``PIL.Image.Image``: EXIF orientation applied, first frame of an
        animation, transparency composited over white, 16-bit scaled to 8-bit. Notes about what
        was done are in ``image.info["plugconv.notes"]``.

    Raises:
        ImageError: with a plain-words message naming the problem (empty file, truncated JPEG, not
            an image: HTML, SVG, HEIC, too many pixels, extreme aspect ratio, URL, ...).
    """
    if isinstance(src, np.ndarray):
        return image_from_array(src, max_pixels=max_pixels)
    if isinstance(src, Image.Image):
        w, h = src.size
        if w * h > max_pixels:
            raise _too_many_pixels(w, h, max_pixels)
        notes: list[str] = []
        try:
            src.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise ImageError(f"truncated or corrupt image ({exc})") from None
        return _finish(src, notes, max_pixels=max_pixels)
    if src is None:
        raise ImageError("no image given")
    if not isinstance(src, (str, Path, bytes, bytearray, memoryview)):
        raise ImageError(f"cannot load an image from {type(src).__name__}; give a file path, bytes, PIL image or array")
    data, name = _read_source(src, max_bytes)
    return _open_bytes(data, name, max_pixels=max_pixels)
