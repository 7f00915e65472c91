"""Fixtures for ingest tests: a loopback HTTP server with real photos, and tar/photo builders."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

DATA = Path(__file__).parent.parent / "data"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - signature of the base class
        pass


@pytest.fixture(scope="session")
def http_server(tmp_path_factory, photos_dir):
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
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    """Loopback requests must never go through a proxy (children inherit the environment)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
