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


def source_images(names: tuple[str, ...] = SKIMAGE, test_photos: bool = True) -> list[Image.Image]:
    """The real photos the benchmarks draw from, as RGB images: scikit-image's ``names``, then
    (``test_photos``) tests/data/photos/*.jpg."""
    from skimage import data

    sources = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in names]
    if test_photos:
        sources += [
            Image.open(p).convert("RGB") for p in sorted((ROOT / "tests/data/photos").glob("*.jpg"))
        ]
    return sources


def make_photos(
    out: Path,
    n: int,
    sizes: tuple[int, ...] = (1024, 768, 512),
    quality: int = 90,
    names: tuple[str, ...] = SKIMAGE,
) -> list[Path]:
    """``n`` JPEG files in ``out`` (``NNNN.jpg``), long side cycling through ``sizes``."""
    sources = source_images(names)
    files = []
    for i in range(n):
        img = sources[i % len(sources)]
        side = sizes[(i // len(sources)) % len(sizes)]
        scale = side / max(img.size)
        img = img.resize(
            (round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC
        )
        files.append(out / f"{i:04d}.jpg")
        img.save(files[-1], quality=quality)
    return files


def photo_store(work: Path, n: int, shard_size: int):
    """``work/photos`` (``make_photos``) ingested into a store at ``work/store``."""
    from pipeline.ingest.folder import ingest_folder
    from pipeline.store import Store

    (work / "photos").mkdir()
    make_photos(work / "photos", n)
    store = Store(str(work / "store"))
    ingest_folder(store, str(work / "photos"), progress=False, shard_size=shard_size)
    return store
