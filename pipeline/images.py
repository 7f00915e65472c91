"""Safe image decoding and normalisation: bytes in, an RGB image or a reason out.

A sample that cannot be used becomes an `ImageError` with a short reason string; callers turn it
into an error row. Nothing here trusts the file extension: the format is read from the content.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# PIL's own bomb guard is a warning below 2x its limit; we decide ourselves from the header.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's default error threshold (2 × 89.5 MP)

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


class ImageError(Exception):
    """A sample that is not a usable image; ``str(e)`` is the reason stored in the error row."""


def decode(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> tuple[Image.Image, dict]:
    """Decode ``data`` to an RGB image with EXIF orientation applied.

    With ``max_side``, a JPEG is decoded at the smallest DCT scale that still covers the
    final size (libjpeg's draft mode), which is several times faster for large photos.

    Returns the image and facts about the source (format, mode, size, alpha). Raises
    `ImageError` for empty, non-image, truncated, oversized or undecodable data.
    """
    if not data:
        raise ImageError("empty file")
    riff_size = 8 + int.from_bytes(data[4:8], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) < riff_size:
        # libwebp refuses a cut file with an opaque "could not create decoder object".
        raise ImageError("truncated image: WebP shorter than its RIFF header says")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not an image (unidentified format)") from None
    except Exception as e:  # PIL raises many types on malformed headers
        raise ImageError(f"unreadable header: {e}") from None
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"invalid size {w}x{h}")
    if w * h > max_pixels:
        raise ImageError(f"decompression bomb: {w}x{h} exceeds {max_pixels} pixels")
    fmt = img.format or "unknown"
    orig_size = img.size
    if fmt == "JPEG" and max_side and max(w, h) > max_side:
        scale = max_side / max(w, h)
        img.draft(img.mode, (int(w * scale) + 1, int(h * scale) + 1))
    try:
        with warnings.catch_warnings(), _strict_truncation():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except OSError as e:
        msg = str(e)
        reason = "truncated image" if "truncated" in msg else f"decode error: {msg}"
        raise ImageError(reason) from None
    except Exception as e:
        raise ImageError(f"decode error: {type(e).__name__}: {e}") from None
    info = {"format": fmt, "mode": img.mode, "had_alpha": False, "decoded_size": orig_size}
    try:
        info["orientation"] = img.getexif().get(0x0112)
    except Exception:
        info["orientation"] = None
    if info["orientation"] not in (None, 1):  # exif_transpose copies the image even when upright
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as e:  # malformed EXIF: keep the stored orientation, but say so
            info["exif_error"] = str(e)
    img, had_alpha = to_rgb(img)
    info["had_alpha"] = had_alpha
    return img, info


@contextlib.contextmanager
def _strict_truncation() -> Iterator[None]:
    """Make PIL raise on truncated data even if some library set ``LOAD_TRUNCATED_IMAGES``.

    With that flag libjpeg pads a truncated scan with grey and only warns: a half-grey image must
    never reach training. PIL's own check is exact (it fails whenever the decoder runs out of
    data), unlike looking for the JPEG end marker, which rejects valid files with trailing data
    (e.g. motion photos that append a video after the JPEG).
    """
    old = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = old


def to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB"), False
    has_alpha = img.mode in ("RGBA", "LA", "RGBa", "La", "PA") or (
        img.mode == "P" and "transparency" in img.info
    )
    if has_alpha:
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB"), True
    if img.mode != "RGB":
        return img.convert("RGB"), False
    return img, False


def fit_max_side(img: Image.Image, max_side: int | None) -> Image.Image:
    """Downsize so the longer side is at most ``max_side``, keeping the aspect ratio; never upsize."""
    if not max_side or max(img.size) <= max_side:
        return img
    w, h = img.size
    scale = max_side / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def encode_jpeg(img: Image.Image, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def prepare(
    data: bytes,
    max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    quality: int = 95,
) -> tuple[bytes, str, dict]:
    """Turn source bytes into the bytes stored in the shard.

    An RGB JPEG that needs no rotation or resize is stored as it came (no generation loss);
    everything else is normalised to RGB and written as JPEG. Returns (bytes, ext, info) where
    info has width/height (stored) and orig_width/orig_height (after EXIF orientation).
    """
    img, info = decode(data, max_pixels, max_side)
    w, h = info.pop("decoded_size")
    rotated = info["orientation"] in (5, 6, 7, 8)
    info["orig_width"], info["orig_height"] = (h, w) if rotated else (w, h)
    out = fit_max_side(img, max_side)
    passthrough = (
        info["format"] == "JPEG"
        and info["mode"] == "RGB"
        and out is img
        and img.size == (w, h)
        and info["orientation"] in (None, 1)
    )
    stored = data if passthrough else encode_jpeg(out, quality)
    info["width"], info["height"] = out.size
    return stored, "jpg", info
