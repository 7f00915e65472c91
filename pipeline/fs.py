"""Filesystem access through fsspec: every store path is a URL (local path, file://, s3://, gs://…).

Writes are atomic: a reader sees either the old file or the whole new one, never a partial one.
On a local filesystem that is a temp file in the same folder plus ``os.replace``; on object
stores a single PUT is already atomic, so we upload a finished local temp file in one call.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import uuid
from collections.abc import Iterator
from typing import IO

import fsspec
from fsspec.implementations.local import LocalFileSystem


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem and the protocol-less path for ``url``."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URL parts with '/', keeping the protocol of ``base``."""
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def is_local(url: str) -> bool:
    return isinstance(filesystem(url)[0], LocalFileSystem)


def local_path(url: str) -> str:
    """The local filesystem path of a local URL (``file://x`` → ``x``)."""
    fs, path = filesystem(url)
    if not isinstance(fs, LocalFileSystem):
        raise ValueError(f"{url} is not on a local filesystem")
    return path


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


def ls(url: str, suffix: str = "") -> list[str]:
    """Sorted base names in folder ``url`` ending with ``suffix`` (empty list if it is missing)."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        return []
    names = [os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False)]
    return sorted(n for n in names if n.endswith(suffix) and ".tmp-" not in n)


def read_bytes(url: str) -> bytes:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as f:
        return f.read()


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.size(path))


def sizes(url: str) -> dict[str, int]:
    """Base name → size in bytes of every file directly in folder ``url`` (one listing call)."""
    fsys, path = filesystem(url)
    fsys.invalidate_cache(path)
    try:
        entries = fsys.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    return {
        os.path.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
        for e in entries
        if e.get("type") == "file"
    }


def move(src: str, dst: str) -> None:
    """Move one file (same filesystem): a rename locally, copy + delete on object stores."""
    fsys, path = filesystem(src)
    _, target = filesystem(dst)
    parent = target.rsplit("/", 1)[0]
    if isinstance(fsys, LocalFileSystem):
        os.makedirs(parent, exist_ok=True)
        os.replace(path, target)
        return
    fsys.mv(path, target)


def remove(url: str) -> None:
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def open_read(url: str) -> IO[bytes]:
    fs, path = filesystem(url)
    return fs.open(path, "rb")


@contextlib.contextmanager
def atomic_open(url: str) -> Iterator[IO[bytes]]:
    """Open ``url`` for binary writing; the file appears under its name only if the block succeeds."""
    fs, path = filesystem(url)
    if isinstance(fs, LocalFileSystem):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    # Object stores: build the file locally, then one PUT (atomic on S3/GCS/Azure).
    with tempfile.NamedTemporaryFile(suffix=".alphaset-upload", delete=False) as f:
        tmp = f.name
    try:
        with open(tmp, "wb") as f:
            yield f
        fs.put_file(tmp, path)
    finally:
        os.remove(tmp)


def create_exclusive(url: str, data: bytes | str) -> bool:
    """Create ``url`` holding ``data`` only if nothing is there yet; False when it exists.

    The test and the write are one step where the backend allows it: a hard link of a finished
    temp file on a local disk (so a reader never sees a half-written file), a conditional PUT
    (``If-None-Match: *``) on S3. Other fsspec backends fall back to check-then-write, which two
    writers racing within the same instant can both pass (see `has_conditional_create`).
    """
    if isinstance(data, str):
        data = data.encode("utf-8")
    fsys, path = filesystem(url)
    if isinstance(fsys, LocalFileSystem):
        folder = os.path.dirname(path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # no hard links here (some FUSE/SMB mounts): O_EXCL, then write
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            return True
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    try:
        fsys.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError:
        # s3fs reports a failed If-None-Match as EINVAL when the server omits the condition name.
        fsys.invalidate_cache(path)
        if fsys.exists(path):
            return False
        raise
    return True


def has_conditional_create(url: str) -> bool:
    """Whether `create_exclusive` is one atomic step on ``url``'s backend (local disk, S3,
    in-memory); elsewhere it is check-then-write."""
    fsys, _ = filesystem(url)
    names = {cls.__name__ for cls in type(fsys).__mro__}
    return bool(names & {"LocalFileSystem", "S3FileSystem", "MemoryFileSystem"})


def ls_fresh(url: str) -> list[str]:
    """Base names in folder ``url``, bypassing any listing cache (object stores cache listings;
    a lock must see what another process wrote a moment ago). Temp files included."""
    fsys, path = filesystem(url)
    fsys.invalidate_cache(path)
    try:
        entries = fsys.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in entries)


def atomic_write(url: str, data: bytes | str) -> None:
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_open(url) as f:
        f.write(data)


def write_parquet(url: str, table) -> str:
    """Write a pyarrow Table as one Parquet file, atomically; return the file's sha256."""
    import hashlib

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    data = buf.getvalue()
    atomic_write(url, data)
    return hashlib.sha256(data).hexdigest()


class UnreadableFile(Exception):
    """A store file that exists but cannot be parsed (damaged): one line naming it."""


def read_parquet(url: str, columns: list[str] | None = None):
    """One Parquet file as a pyarrow Table; a damaged file is an `UnreadableFile` naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open_read(url) as f:
        try:
            return pq.read_table(f, columns=columns)
        except (pa.ArrowException, OSError) as e:
            if isinstance(e, OSError) and e.errno is not None:
                raise  # a real I/O error (pyarrow's decoding errors carry no errno)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise UnreadableFile(
                f"{url} is not a readable Parquet file ({reason}); 'alphaset manifest verify' "
                "lists damaged files and 'alphaset manifest repair' sets them aside for a redo"
            ) from None
