"""Fixtures for caption tests: a store of real photos and the tiny LLaVA models, built once."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.ingest.folder import ingest_folder
from pipeline.store import Store


def make_store(
    root: Path,
    photos: Path,
    shard_size: int = 3,
    copies: int = 1,
    alts: dict[str, str] | None = None,
) -> Store:
    """A store of the real test photos (``copies`` times each, named ``<stem>_<i>``); ``alts``
    maps a photo stem to an alt-text sidecar."""
    src = root / "src"
    src.mkdir(parents=True)
    for i in range(copies):
        for p in sorted(photos.iterdir()):
            shutil.copy(p, src / f"{p.stem}_{i}{p.suffix}")
            if alts and p.stem in alts:
                (src / f"{p.stem}_{i}.txt").write_text(alts[p.stem])
    store = Store(str(root / "store"))
    ingest_folder(store, str(src), progress=False, shard_size=shard_size)
    return store


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread, and CI machines are small and shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def store_factory(tmp_path, photos_dir):
    """``store_factory(**make_store kwargs)`` → a new store of the test photos."""
    count = iter(range(1000))
    return lambda **kw: make_store(tmp_path / f"f{next(count)}", photos_dir, **kw)


@pytest.fixture
def photo_store(tmp_path, photos_dir) -> Store:
    """6 photos in shards of 3 (2 shards)."""
    return make_store(tmp_path, photos_dir, shard_size=3)


@pytest.fixture(scope="session")
def tiny_dir() -> str:
    """The tiny preset's folder, built once per session into the test model cache."""
    from captioning.models import PRESETS
    from pipeline.models import tiny_model_dir

    return tiny_model_dir("caption", PRESETS["tiny"])


@pytest.fixture(scope="session")
def tiny_loaded(tiny_dir):
    """(model, processor) of the tiny preset, loaded once through `Captioner.load`."""
    from captioning.captioner import CaptionConfig, Captioner

    c = Captioner.load(tiny_dir, CaptionConfig())
    return c.model, c.processor
