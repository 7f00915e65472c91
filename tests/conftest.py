"""Shared fixtures: real photos on disk, a per-session tiny-model cache, and one local Ray."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _tiny_model_cache(tmp_path_factory):
    """Tiny models are built once per test session into a private cache (never the user's)."""
    os.environ["ALPHASET_CACHE"] = str(tmp_path_factory.mktemp("alphaset-cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    yield


@pytest.fixture(scope="session")
def photos_dir(tmp_path_factory) -> Path:
    """The real skimage.data photos written as JPEG/PNG files (the demo's inputs)."""
    from PIL import Image
    from skimage import data

    out = tmp_path_factory.mktemp("photos")
    for i, name in enumerate(SKIMAGE_PHOTOS):
        arr = getattr(data, name)()
        img = Image.fromarray(arr)
        if i % 2:
            img.save(out / f"{name}.png")
        else:
            img.convert("RGB").save(out / f"{name}.jpg", quality=92)
    return out


@pytest.fixture(scope="session")
def ray_local():
    """One embedded local Ray for the whole session (starting Ray costs seconds)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def make_tar() -> Callable[[Path, list[tuple[str, bytes]]], Path]:
    """Write a tar holding ``[(member_name, bytes)]`` exactly as given (unsafe names included)."""

    def write(path: Path, members: list[tuple[str, bytes]]) -> Path:
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    return write
