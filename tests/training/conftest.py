"""Fixtures for the feature stage: a store of real photos with alt texts (some awkward on purpose)."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

# A caption far longer than 120 T5 tokens.
LONG_CAPTION = " ".join(
    ["a very detailed photograph of a small orange cat sitting on a wooden table next to a cup of"
     " coffee in the morning light, with mountains and a blue sky behind the window"] * 8
)  # fmt: skip
SAME_CAPTION = "a photo of something grey"
URL_ONLY = "https://example.com/images/12345.jpg"

# file stem → (source photo, label folder, alt text, crop box as fractions or None)
FEATURE_PHOTOS = {
    "astronaut": (
        "astronaut",
        "person",
        "Portrait of an <b>astronaut</b>   in an orange suit",
        None,
    ),
    "chelsea": ("chelsea", "cat", LONG_CAPTION, None),
    "coffee": ("coffee", "cup", "A cup of coffee, see www.coffee.com for more", None),
    "rocket": ("rocket", "rocket", SAME_CAPTION, None),
    "camera": ("camera", "person", SAME_CAPTION, None),
    "wide": ("astronaut", "strip", "a wide strip of a photo", (0.0, 0.45, 1.0, 0.55)),  # 10:1
    "tall": ("rocket", "strip", "a tall strip of a photo", (0.45, 0.0, 0.55, 1.0)),  # ~1:6.7
    "urlonly": ("coffee", "cup", URL_ONLY, None),
}


@pytest.fixture(scope="session")
def feature_texts() -> dict[str, str]:
    """Photo stem → its alt text."""
    return {stem: alt for stem, (_, _, alt, _) in FEATURE_PHOTOS.items()}


@pytest.fixture(scope="session")
def feature_photos(photos_dir: Path, tmp_path_factory) -> Path:
    """An ImageNet-style tree (label folders) of the skimage photos with ``.txt`` alt texts."""
    out = tmp_path_factory.mktemp("feature-photos")
    sources = {p.stem: p for p in photos_dir.iterdir()}
    for stem, (src, label, alt, box) in FEATURE_PHOTOS.items():
        img = Image.open(sources[src]).convert("RGB")
        if box is not None:
            w, h = img.size
            img = img.crop(
                (round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h))
            )
        folder = out / label
        folder.mkdir(exist_ok=True)
        img.save(folder / f"{stem}.jpg", quality=90)
        (folder / f"{stem}.txt").write_text(alt + "\n")
    return out


@pytest.fixture(scope="session")
def feature_store_template(feature_photos: Path, tmp_path_factory) -> Path:
    """An ingested store (shards of 3) built once; tests copy it."""
    from pipeline.ingest.folder import ingest_folder
    from pipeline.store import Store

    root = tmp_path_factory.mktemp("feature-store") / "store"
    ingest_folder(
        Store(str(root)), str(feature_photos), label_from_dir=True, progress=False, shard_size=3
    )
    return root


@pytest.fixture
def feature_store(feature_store_template: Path, tmp_path: Path) -> str:
    """A private copy of the ingested store."""
    import shutil

    dst = tmp_path / "store"
    shutil.copytree(feature_store_template, dst)
    return str(dst)
