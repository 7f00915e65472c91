"""Shared fixtures: real photos on disk, a per-session tiny-model cache, one local Ray, loopback
HTTP servers and tar builders."""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import tarfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from ports import free_port

# gcsfs probes each bucket's type over gRPC when it is imported with this on (its default); the
# GCS emulator serves only the JSON API, so every first access would wait 60 s for the probe.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

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


@pytest.fixture(scope="session")
def serve_loopback() -> Callable[[type[http.server.BaseHTTPRequestHandler]], str]:
    """``serve(handler)`` starts a threaded HTTP server on 127.0.0.1 (random port) that runs
    until the session ends, and returns its base URL."""
    servers: list[http.server.ThreadingHTTPServer] = []

    def serve(handler: type[http.server.BaseHTTPRequestHandler]) -> str:
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield serve
    for httpd in servers:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def no_proxy(monkeypatch):
    """Loopback requests never go through a proxy (child processes inherit the environment)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@contextlib.contextmanager
def _loopback_server(tmp_path_factory, name: str, module_args: list[str], probe: str):
    """``python -m <module_args>`` (``{port}`` filled in) on a free loopback port, its output in
    a log file; yields ``http://127.0.0.1:PORT`` once ``probe`` (a path) answers, stops it after."""
    import subprocess
    import sys
    import time
    import urllib.request

    port = free_port()
    log = open(tmp_path_factory.mktemp(name) / f"{name}.log", "wb")
    args = [a.format(port=port) for a in module_args]
    proc = subprocess.Popen([sys.executable, "-m", *args], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint + probe, timeout=1)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{name} did not start on {endpoint}") from None
            time.sleep(0.2)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _bucket_name(request) -> str:
    """A fresh bucket name from the test's name."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A GCS endpoint: gcp-storage-emulator (its JSON API, in memory) on a free loopback port,
    for the whole session. Yields ``http://127.0.0.1:PORT``; gcsfs reaches it through
    STORAGE_EMULATOR_HOST (set by ``gcs_bucket``)."""
    args = ["gcp_storage_emulator", "start", "-H", "127.0.0.1", "--port", "{port}", "--in-memory"]
    with _loopback_server(tmp_path_factory, "gcs", args, "/storage/v1/b?project=test") as url:
        yield url


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch, request) -> str:
    """A fresh bucket on the GCS emulator; returns ``gs://<bucket>``. The store options are
    what a user of an emulator passes (an anonymous token)."""
    import gcsfs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_server)
    monkeypatch.setenv("ALPHASET_STORAGE_OPTIONS", '{"token": "anon", "project": "test"}')
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    bucket = _bucket_name(request)
    gcsfs.GCSFileSystem(token="anon", project="test", skip_instance_cache=True).mkdir(bucket)
    return f"gs://{bucket}"


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint: moto's server mode on a free loopback port, for the whole session.

    Yields the endpoint URL. Clients reach it through the standard AWS environment variables
    (set by ``s3_env``), so subprocesses and Ray workers see the same endpoint.
    """
    args = ["moto.server", "-H", "127.0.0.1", "-p", "{port}"]
    with _loopback_server(tmp_path_factory, "moto", args, "/moto-api/") as url:
        yield url


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point every AWS client (s3fs/botocore, in this process and its children) at the moto
    endpoint with dummy credentials, bypassing any proxy for loopback."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return s3_server


@pytest.fixture
def s3_bucket(s3_env, request) -> str:
    """A fresh, empty bucket on the moto endpoint; returns ``s3://<bucket>``."""
    import s3fs

    bucket = _bucket_name(request)
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}"
