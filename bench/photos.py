"""Benchmark inputs: real photos (scikit-image's bundled ones + tests/data/photos) written as JPEGs."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SKIMAGE = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "camera",
    "immunohistochemistry",
    "hubble_deep_field",
)


def source_images() -> list[Image.Image]:
    """The real photos every benchmark draws from, as RGB images."""
    from skimage import data

    sources = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in SKIMAGE]
    sources += [
        Image.open(p).convert("RGB") for p in sorted((ROOT / "tests/data/photos").glob("*.jpg"))
    ]
    return sources


def make_photos(out: Path, n: int, sizes: tuple[int, ...] = (1024, 768, 512)) -> None:
    """``n`` JPEG files (q90) in ``out``, long side cycling through ``sizes``."""
    sources = source_images()
    for i in range(n):
        img = sources[i % len(sources)]
        side = sizes[(i // len(sources)) % len(sizes)]
        scale = side / max(img.size)
        img = img.resize(
            (round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC
        )
        img.save(out / f"{i:04d}.jpg", quality=90)
