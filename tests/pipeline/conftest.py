"""Fixtures for ingest tests: a loopback HTTP server with real photos."""

from __future__ import annotations

import functools
import http.server
import shutil
from pathlib import Path

import pytest

DATA = Path(__file__).parent.parent / "data"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@pytest.fixture(scope="session")
def http_server(tmp_path_factory, photos_dir, serve_loopback):
    """Serve real photos over HTTP on 127.0.0.1 (random port) for the whole session.

    Yields ``(base_url, folder)``: ``photos/<name>`` are the skimage photos and tests/data photos,
    ``notes.jpg`` is a text file with an image name; any other path answers 404.
    """
    root = tmp_path_factory.mktemp("http")
    (root / "photos").mkdir()
    for p in sorted(photos_dir.iterdir()):
        shutil.copy(p, root / "photos" / p.name)
    for name in ("sam_dog.jpg", "rembg_girl-1.jpg", "exif_Landscape_6.jpg"):
        shutil.copy(DATA / "photos" / name, root / "photos" / name)
    (root / "notes.jpg").write_text("this is not an image\n")
    return serve_loopback(functools.partial(_QuietHandler, directory=str(root))), root
