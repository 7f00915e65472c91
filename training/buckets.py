"""PixArt-α's aspect-ratio buckets: the tables, nearest-bucket choice, and resize-to-cover + crop.

The tables are PixArt-α's training tables (``ASPECT_RATIO_256/512/1024`` in
``diffusion/data/datasets/utils.py``, 40 buckets each, height/width ratios 0.25–4.0), keyed by
the rounded h/w ratio as PixArt writes them, values ``(height, width)`` in pixels, every side a
multiple of 16 (so of the VAE's 8 and the DiT's patch 2 after it). diffusers'
``ASPECT_RATIO_*_BIN`` tables are PixArt's 33-bucket *inference* subset (``*_TEST``); training
features use the full tables, and the choice rule is PixArt's ``get_closest_ratio``: the bucket
whose ratio key is nearest (absolute difference) to the image's height / width.
"""

from __future__ import annotations

from PIL import Image

from pipeline.errors import UserError

ASPECT_RATIO_1024: dict[str, tuple[int, int]] = {
    "0.25": (512, 2048), "0.26": (512, 1984), "0.27": (512, 1920), "0.28": (512, 1856),
    "0.32": (576, 1792), "0.33": (576, 1728), "0.35": (576, 1664), "0.4": (640, 1600),
    "0.42": (640, 1536), "0.48": (704, 1472), "0.5": (704, 1408), "0.52": (704, 1344),
    "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216), "0.72": (832, 1152),
    "0.78": (896, 1152), "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024),
    "1.0": (1024, 1024), "1.07": (1024, 960), "1.13": (1088, 960), "1.21": (1088, 896),
    "1.29": (1152, 896), "1.38": (1152, 832), "1.46": (1216, 832), "1.67": (1280, 768),
    "1.75": (1344, 768), "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640),
    "2.5": (1600, 640), "2.89": (1664, 576), "3.0": (1728, 576), "3.11": (1792, 576),
    "3.62": (1856, 512), "3.75": (1920, 512), "3.88": (1984, 512), "4.0": (2048, 512),
}  # fmt: skip

ASPECT_RATIO_512: dict[str, tuple[int, int]] = {
    "0.25": (256, 1024), "0.26": (256, 992), "0.27": (256, 960), "0.28": (256, 928),
    "0.32": (288, 896), "0.33": (288, 864), "0.35": (288, 832), "0.4": (320, 800),
    "0.42": (320, 768), "0.48": (352, 736), "0.5": (352, 704), "0.52": (352, 672),
    "0.57": (384, 672), "0.6": (384, 640), "0.68": (416, 608), "0.72": (416, 576),
    "0.78": (448, 576), "0.82": (448, 544), "0.88": (480, 544), "0.94": (480, 512),
    "1.0": (512, 512), "1.07": (512, 480), "1.13": (544, 480), "1.21": (544, 448),
    "1.29": (576, 448), "1.38": (576, 416), "1.46": (608, 416), "1.67": (640, 384),
    "1.75": (672, 384), "2.0": (704, 352), "2.09": (736, 352), "2.4": (768, 320),
    "2.5": (800, 320), "2.89": (832, 288), "3.0": (864, 288), "3.11": (896, 288),
    "3.62": (928, 256), "3.75": (960, 256), "3.88": (992, 256), "4.0": (1024, 256),
}  # fmt: skip

ASPECT_RATIO_256: dict[str, tuple[int, int]] = {
    "0.25": (128, 512), "0.26": (128, 496), "0.27": (128, 480), "0.28": (128, 464),
    "0.32": (144, 448), "0.33": (144, 432), "0.35": (144, 416), "0.4": (160, 400),
    "0.42": (160, 384), "0.48": (176, 368), "0.5": (176, 352), "0.52": (176, 336),
    "0.57": (192, 336), "0.6": (192, 320), "0.68": (208, 304), "0.72": (208, 288),
    "0.78": (224, 288), "0.82": (224, 272), "0.88": (240, 272), "0.94": (240, 256),
    "1.0": (256, 256), "1.07": (256, 240), "1.13": (272, 240), "1.21": (272, 224),
    "1.29": (288, 224), "1.38": (288, 208), "1.46": (304, 208), "1.67": (320, 192),
    "1.75": (336, 192), "2.0": (352, 176), "2.09": (368, 176), "2.4": (384, 160),
    "2.5": (400, 160), "2.89": (416, 144), "3.0": (432, 144), "3.11": (448, 144),
    "3.62": (464, 128), "3.75": (480, 128), "3.88": (496, 128), "4.0": (512, 128),
}  # fmt: skip

TABLES: dict[int, dict[str, tuple[int, int]]] = {
    256: ASPECT_RATIO_256,
    512: ASPECT_RATIO_512,
    1024: ASPECT_RATIO_1024,
}
RESOLUTIONS = tuple(TABLES)


def check_resolution(resolution: int) -> int:
    if resolution not in TABLES:
        allowed = ", ".join(str(r) for r in RESOLUTIONS)
        raise UserError(f"--resolution must be one of {allowed}, got {resolution}")
    return resolution


def buckets(resolution: int, multi_scale: bool) -> list[tuple[int, int]]:
    """Every (height, width) a sample can get: PixArt's table, or the one square."""
    check_resolution(resolution)
    if not multi_scale:
        return [(resolution, resolution)]
    return list(TABLES[resolution].values())


def nearest_bucket(height: int, width: int, resolution: int) -> tuple[int, int]:
    """PixArt's ``get_closest_ratio``: the bucket whose h/w key is nearest to ``height / width``.

    Ratios beyond the table (10:1, 1:10) land in the extreme buckets (4.0, 0.25); ties go to the
    first key in table order, as ``min`` does in PixArt.
    """
    table = TABLES[check_resolution(resolution)]
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    ratio = height / width
    key = min(table, key=lambda r: abs(float(r) - ratio))
    return table[key]


def bucket_ratio(height: int, width: int, resolution: int) -> float:
    """The ratio key of the bucket ``(height, width)`` (PixArt's ``closest_ratio``, the aspect
    micro-condition it trains with: 0.57 for 768 × 1344, not 0.5714); h / w off the table."""
    for key, size in TABLES[check_resolution(resolution)].items():
        if size == (height, width):
            return float(key)
    return height / width


def target_size(height: int, width: int, resolution: int, multi_scale: bool) -> tuple[int, int]:
    """The (height, width) this image is cropped to: its nearest bucket, or the square."""
    if multi_scale:
        return nearest_bucket(height, width, resolution)
    check_resolution(resolution)
    return resolution, resolution


def resize_cover_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Scale ``img`` (bicubic, antialiased) so it covers ``height × width``, then centre-crop.

    This is PixArt's multi-scale transform (``Resize`` to cover, ``CenterCrop``); the square
    single-scale case (short side → resolution, centre crop) is the same rule with h == w.
    """
    w0, h0 = img.size
    scale = max(height / h0, width / w0)
    # max(): float rounding must never leave a side one pixel short of the crop.
    rw, rh = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    if (rw, rh) != (w0, h0):
        img = img.resize((rw, rh), Image.Resampling.BICUBIC, reducing_gap=None)
    left = int(round((rw - width) / 2.0))  # torchvision CenterCrop's rounding
    top = int(round((rh - height) / 2.0))
    return img.crop((left, top, left + width, top + height))
