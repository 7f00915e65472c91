"""Fixtures for SA-1B tests: real photos packed as SA-1B tars, and a loopback HTTP file server with
Range support that can cut a transfer half-way, ignore Range, or answer an error status."""

from __future__ import annotations

import copy
import http.server
import io
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

DATA = Path(__file__).parent.parent / "data"
SA_PHOTOS = (
    "sam_dog.jpg",
    "sam_groceries.jpg",
    "sam_truck.jpg",
    "sam_dogs.jpg",
    "rembg_girl-1.jpg",
)


# ---- SA-1B-format samples from real photos ----------------------------------------------------
@pytest.fixture(scope="session")
def sa_photos() -> list[bytes]:
    """The real photos of tests/data/photos, resized (short side 48 px) and JPEG-encoded."""
    out = []
    for name in SA_PHOTOS:
        img = Image.open(DATA / "photos" / name).convert("RGB")
        scale = 48 / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)))
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="session")
def sa_annotation() -> Callable[[int, bytes, int], bytes]:
    """``make(image_id, jpg, n_masks)``: an annotation json in the real SA-1B format, modelled on
    tests/data/sa1b/synthetic_annotation_a.json, with the photo's size and ``n_masks`` masks."""
    template = json.loads((DATA / "sa1b" / "synthetic_annotation_a.json").read_text())

    def make(image_id: int, jpg: bytes, n_masks: int) -> bytes:
        w, h = Image.open(io.BytesIO(jpg)).size
        doc = copy.deepcopy(template)
        doc["image"] = {
            "image_id": image_id,
            "width": w,
            "height": h,
            "file_name": f"sa_{image_id}.jpg",
        }
        ann = template["annotations"][0]
        doc["annotations"] = [
            {**copy.deepcopy(ann), "id": 1000 * image_id + i} for i in range(n_masks)
        ]
        return json.dumps(doc).encode()

    return make


@pytest.fixture(scope="session")
def sa_members(sa_photos, sa_annotation) -> Callable[[list[int]], list[tuple[str, bytes]]]:
    """``members(ids)``: ``sa_<id>.jpg`` + ``sa_<id>.json`` pairs; image_id i gets i % 7 + 1 masks."""

    def members(ids: list[int]) -> list[tuple[str, bytes]]:
        out = []
        for i in ids:
            jpg = sa_photos[i % len(sa_photos)]
            out.append((f"sa_{i}.jpg", jpg))
            out.append((f"sa_{i}.json", sa_annotation(i, jpg, i % 7 + 1)))
        return out

    return members


# ---- loopback HTTP server ---------------------------------------------------------------------
@dataclass
class Served:
    data: bytes
    cut_first: bool = False  # the first request gets half the body, then the connection drops
    ignore_range: bool = False  # answer 200 with the whole file even to a Range request
    status: int | None = None  # always answer this error status
    hits: int = 0


@dataclass
class FileServer:
    base: str = ""
    files: dict[str, Served] = field(default_factory=dict)
    log: list[tuple[str, str | None, int]] = field(default_factory=list)  # (path, Range, status)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, data: bytes, **behaviour) -> str:
        """Serve ``data`` at ``/<name>``; return a URL shaped like the real signed CDN links."""
        self.files[name] = Served(data, **behaviour)
        return f"{self.base}/m1/v/t6/{name}?_nc_gid&ccb=10-5&oh=00_Af&oe=699024E8&_nc_sid=0fdd51"

    def requests_for(self, name: str) -> list[tuple[str, str | None, int]]:
        return [r for r in self.log if r[0] == name]


def _handler(server: FileServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, format, *args):  # noqa: A002 - signature of the base class
            pass

        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            name = self.path.split("?", 1)[0].rsplit("/", 1)[-1]
            rng = self.headers.get("Range")
            served = server.files.get(name)
            if served is None:
                return self._answer(name, rng, 404)
            with server.lock:
                served.hits += 1
                first = served.hits == 1
            if served.status is not None:
                return self._answer(name, rng, served.status)
            data, start = served.data, 0
            m = re.match(r"^bytes=(\d+)-$", rng or "")
            if m and not served.ignore_range:
                start = int(m.group(1))
                if start >= len(data):
                    return self._answer(name, rng, 416, {"Content-Range": f"bytes */{len(data)}"})
            body = data[start:]
            status = 206 if start else 200
            headers = {"Content-Length": str(len(body)), "Content-Type": "application/x-tar"}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            with server.lock:
                server.log.append((name, rng, status))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if served.cut_first and first:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def _answer(
            self, name: str, rng: str | None, status: int, headers: dict | None = None
        ) -> None:
            with server.lock:
                server.log.append((name, rng, status))
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@pytest.fixture(scope="session")
def _http_server(serve_loopback):
    state = FileServer()
    state.base = serve_loopback(_handler(state))
    return state


@pytest.fixture
def file_server(_http_server, no_proxy) -> FileServer:
    """The session's loopback server, emptied for this test; loopback never goes through a proxy."""
    _http_server.files.clear()
    _http_server.log.clear()
    return _http_server
