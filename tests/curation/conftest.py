"""Fixtures for scoring and dedup tests: crafted near-duplicates of a real photo, and one store
scored once per session with the tiny random CLIP (built and loaded as a local open_clip folder)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from pipeline.ingest.folder import ingest_folder
from pipeline.store import Store


def _make_store(root: Path, src: Path, shard_size: int = 4) -> Store:
    store = Store(str(root))
    ingest_folder(store, str(src), progress=False, shard_size=shard_size)
    return store


@pytest.fixture
def make_store():
    """``make_store(root, src_folder, shard_size=4)`` → a freshly ingested `Store`."""
    return _make_store


@pytest.fixture
def keys_by_name():
    """``keys_by_name(store)`` → {file stem: store key} (keys are '<slug>-<hash>')."""

    def lookup(store: Store) -> dict[str, str]:
        out = {}
        for shard in store.shards():
            t = store.read_meta(shard, ["key", "path"]).to_pydict()
            for key, path in zip(t["key"], t["path"], strict=True):
                out[Path(path).stem] = key
        return out

    return lookup


@pytest.fixture(scope="session")
def dup_photos(photos_dir, tmp_path_factory) -> Path:
    """The six skimage photos plus copies that dedup must group with their original: astronaut
    resized to 60 % (astronaut_small), re-compressed at JPEG quality 30 (astronaut_q30), cropped by
    2 % on every side (astronaut_crop2), and a byte-identical copy of coffee (coffee_copy)."""
    out = tmp_path_factory.mktemp("dup_photos")
    for p in photos_dir.iterdir():
        shutil.copy(p, out / p.name)
    shutil.copy(photos_dir / "coffee.jpg", out / "coffee_copy.jpg")
    img = Image.open(photos_dir / "astronaut.jpg").convert("RGB")
    w, h = img.size
    img.resize((w * 6 // 10, h * 6 // 10), Image.Resampling.LANCZOS).save(
        out / "astronaut_small.jpg", quality=90
    )
    img.save(out / "astronaut_q30.jpg", quality=30)
    img.crop((w // 50, h // 50, w - w // 50, h - h // 50)).save(
        out / "astronaut_crop2.jpg", quality=90
    )
    return out


@pytest.fixture(scope="session")
def scored_store(dup_photos, tmp_path_factory) -> Store:
    """10 photos in 3 shards, scored by `score_store` without Ray (the worker runs in-process)."""
    from curation.score import ScoreConfig, score_store

    store = _make_store(tmp_path_factory.mktemp("scored") / "store", dup_photos)
    summary = score_store(
        store,
        ScoreConfig(clip="tiny", batch_size=4, decode_workers=2),
        progress=False,
        use_ray=False,
    )
    assert summary.ok and len(summary.done) == 3
    return store
