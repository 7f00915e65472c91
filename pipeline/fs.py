"""Filesystem access through fsspec: every store path is a URL (local path, file://, s3://, gs://…).

Writes are atomic: a reader sees either the old file or the whole new one, never a partial one.
On a local filesystem that is a temp file in the same folder plus ``os.replace``; on object
stores an upload becomes visible only when it completes (one PUT, or CompleteMultipartUpload),
so we stream straight into it and abort it on error: nothing is spooled to a local temp file,
so a killed run leaves nothing behind on the machine. A kill during a multipart upload leaves an
incomplete upload in the bucket, invisible to readers; a bucket lifecycle rule removes it (README).

Object stores take options (endpoint, profile, anonymous access…) from ``--storage-options JSON``
or ``ALPHASET_STORAGE_OPTIONS`` (one JSON object, passed to fsspec). Their listing caches are off:
the store's truth (status records, manifest refresh, verify) is what the store holds now, not
what this process listed a minute ago.
"""

from __future__ import annotations

import contextlib
import contextvars
import io
import json
import os
import uuid
from collections.abc import Iterator
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

STORAGE_OPTIONS_ENV = "ALPHASET_STORAGE_OPTIONS"
# Protocols whose uploads appear only once complete, and the pip extra that installs each.
OBJECT_STORES = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
LOCAL_PROTOCOLS = (None, "file", "local")


class StorageError(Exception):
    """The storage behind a URL cannot be used as asked: missing package, credentials, bucket,
    endpoint or permission. One line, for the user to fix."""


def storage_options() -> dict[str, Any]:
    """The fsspec options for remote stores, from ``ALPHASET_STORAGE_OPTIONS`` (a JSON object)."""
    text = os.environ.get(STORAGE_OPTIONS_ENV, "").strip()
    if not text:
        return {}
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as e:
        raise StorageError(f"--storage-options / {STORAGE_OPTIONS_ENV} is not JSON: {e}") from None
    if not isinstance(opts, dict):
        raise StorageError(
            f"--storage-options / {STORAGE_OPTIONS_ENV} must be a JSON object, e.g. "
            '\'{"endpoint_url": "http://127.0.0.1:9000"}\', not ' + text
        )
    return opts


def protocol(url: str) -> str | None:
    return fsspec.core.split_protocol(url)[0]


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem and the protocol-less path for ``url``.

    Remote filesystems get the storage options and no listing cache (see the module docstring).
    """
    proto = protocol(url)
    kwargs: dict[str, Any] = {}
    if proto not in LOCAL_PROTOCOLS:
        kwargs = {"use_listings_cache": False, **storage_options()}
    try:
        return fsspec.core.url_to_fs(url, **kwargs)
    except ImportError as e:
        extra = OBJECT_STORES.get(proto or "")
        hint = f"pip install 'alphaset[{extra}]'" if extra else str(e)
        raise StorageError(
            f"{url}: {proto}:// needs a package that is not installed: {hint}"
        ) from None


def storage_error(e: BaseException, url: str = "") -> StorageError | None:
    """The one-line user error for a storage failure (credentials, endpoint), or None
    when ``e`` is something else. Library exceptions are matched by name, so botocore and
    google-auth need not be installed."""
    if isinstance(e, StorageError):
        return e
    where = f" ({url})" if url else ""
    names = {c.__name__ for c in type(e).__mro__}
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}:
        return StorageError(
            f"no credentials for the object store{where}: set AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY or AWS_PROFILE (GCS: GOOGLE_APPLICATION_CREDENTIALS), or pass "
            "--storage-options '{\"anon\": true}' for a public bucket"
        )
    if names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"}:
        return StorageError(
            f"cannot reach the object store endpoint{where}: {_first_line(e)}; check "
            "AWS_ENDPOINT_URL or --storage-options endpoint_url, and the network"
        )
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_bucket(url: str) -> None:
    """For an object-store URL, fail with one line unless its bucket exists and is reachable.

    A store is never allowed to create a bucket by accident (a typo would make a new one)."""
    proto = protocol(url)
    if proto in LOCAL_PROTOCOLS:
        return
    fsys, path = filesystem(url)
    bucket = path.split("/", 1)[0]
    try:
        fsys.info(bucket)
    except FileNotFoundError:
        make = {"gcs": f"gcloud storage buckets create gs://{bucket}"}.get(
            OBJECT_STORES.get(proto or ""), f"aws s3 mb s3://{bucket}"
        )
        raise StorageError(
            f"bucket {bucket!r} of {url} does not exist: create it first (e.g. '{make}'); "
            "alphaset never creates buckets"
        ) from None
    except PermissionError as e:
        raise StorageError(
            f"access denied to bucket {bucket!r} of {url}: {_first_line(e)}"
        ) from None
    except TypeError as e:  # an option the filesystem does not take, found at its first request
        raise StorageError(
            f"--storage-options / {STORAGE_OPTIONS_ENV}: not accepted by {type(fsys).__name__}: {e}"
        ) from None
    except Exception as e:  # translated to one line when it is a storage failure
        err = storage_error(e, url)
        if err is None:
            raise
        raise err from None


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
    """Create folder ``url``; a no-op on object stores, which have no folders (and where
    fsspec would create a missing bucket)."""
    if protocol(url) in OBJECT_STORES:
        return
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


class ListingSnapshot:
    """Within ``with snapshot:`` (this thread only), each folder is listed once and the listing
    shared by `ls`, `listing`, `sizes` and `ls_fresh`, until something is written into the folder
    through this module. For a start-up phase that reads the same folders several times (a stage
    run under its lease: clean-up, settings, done shards); leave it before workers run. A
    snapshot can be entered again later, keeping its listings."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._tokens: list[contextvars.Token] = []

    def prefetch(self, urls: list[str]) -> None:
        """List the folders ``urls`` concurrently into the snapshot (on S3 each listing is a
        chain of requests, one per 1,000 files; chains of different folders need not wait)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(url: str) -> None:
            fsys, path = filesystem(url)
            self.entries[_folder_key(fsys, path)] = _list(fsys, path)

        with ThreadPoolExecutor(max(1, min(8, len(urls)))) as pool:
            list(pool.map(one, urls))

    def __enter__(self) -> ListingSnapshot:
        self._tokens.append(_SNAPSHOT.set(self))
        return self

    def __exit__(self, *exc: object) -> None:
        _SNAPSHOT.reset(self._tokens.pop())


_SNAPSHOT: contextvars.ContextVar[ListingSnapshot | None] = contextvars.ContextVar(
    "alphaset_listing_snapshot", default=None
)


def _folder_key(fsys: fsspec.AbstractFileSystem, path: str) -> tuple[str, str]:
    return type(fsys).__name__, path.rstrip("/")


def _entries(url: str) -> list[dict[str, Any]]:
    """fsspec's detailed listing of folder ``url`` (empty when missing), from the current
    `ListingSnapshot` when there is one."""
    fsys, path = filesystem(url)
    snap = _SNAPSHOT.get()
    key = _folder_key(fsys, path)
    if snap is not None and key in snap.entries:
        return snap.entries[key]
    entries = _list(fsys, path)
    if snap is not None:
        snap.entries[key] = entries
    return entries


def _list(fsys: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    fsys.invalidate_cache(path)
    try:
        return fsys.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _written(fsys: fsspec.AbstractFileSystem, path: str) -> None:
    """Forget the snapshot listing of the folder that holds ``path`` (it changed)."""
    snap = _SNAPSHOT.get()
    if snap is not None:
        snap.entries.pop(_folder_key(fsys, path.rstrip("/").rsplit("/", 1)[0]), None)


def _stem_entries(url: str, stem: str) -> list[dict[str, Any]]:
    """The files directly in folder ``url`` whose names start with ``stem``: a prefix listing on
    the object stores that have one (S3, GCS), else the folder's listing filtered. Never from a
    `ListingSnapshot`: callers ask it to see what changed a moment ago."""
    fsys, path = filesystem(url)
    base = path.rstrip("/")
    if protocol(url) in OBJECT_STORES:
        fsys.invalidate_cache(base)
        try:
            found = fsys.find(base, prefix=stem, detail=True, withdirs=False, maxdepth=1)
        except (FileNotFoundError, NotADirectoryError):
            return []
        except TypeError:  # a filesystem whose find() takes no prefix: the whole listing
            found = {e["name"]: e for e in _list(fsys, base)}
        return [e for e in found.values() if e["name"].rstrip("/").rsplit("/", 1)[0] == base]
    return [
        e for e in _list(fsys, base) if os.path.basename(e["name"].rstrip("/")).startswith(stem)
    ]


def ls(url: str, suffix: str = "") -> list[str]:
    """Sorted base names in folder ``url`` ending with ``suffix`` (empty list if it is missing)."""
    names = [os.path.basename(e["name"].rstrip("/")) for e in _entries(url)]
    return sorted(n for n in names if n.endswith(suffix) and ".tmp-" not in n)


def listing(url: str, stem: str = "") -> dict[str, str]:
    """``{base name: fingerprint}`` of the files in folder ``url`` (temp files excluded), from one
    listing (one request per 1,000 names on S3). A fingerprint changes whenever the file is
    rewritten (ETag/generation, size, modification time), so comparing two listings tells which
    files to re-read without reading any. ``stem``: only the names that start with it — on an
    object store a prefix listing, one request however many other files the folder holds."""
    out = {}
    for e in _stem_entries(url, stem) if stem else _entries(url):
        if e.get("type") == "directory":
            continue
        name = os.path.basename(e["name"].rstrip("/"))
        if ".tmp-" in name:
            continue
        out[name] = "|".join(
            str(e[k])
            for k in ("ETag", "etag", "generation", "size", "mtime", "LastModified", "updated")
            if e.get(k) is not None
        )
    return out


def read_many(urls: list[str]) -> dict[str, bytes]:
    """``{url: bytes}`` of many small files, fetched concurrently on object stores (fsspec's
    batched ``cat``). Files that vanished meanwhile are left out; other errors raise."""
    if not urls:
        return {}
    fs, _ = filesystem(urls[0])
    paths = {fs._strip_protocol(u): u for u in urls}
    got = fs.cat(list(paths), on_error="return", **_small_file_kwargs(urls[0]))
    out = {}
    for path, data in got.items():
        if isinstance(data, FileNotFoundError):
            continue
        if isinstance(data, BaseException):
            raise data
        out[paths[path]] = data
    return out


def _small_file_kwargs(url: str) -> dict[str, Any]:
    """s3fs asks for a file's size (HEAD) before a GET, to split big files into concurrent
    ranged reads; for small files (records, indexes, manifest) that doubles the requests."""
    return {"max_concurrency": 1} if protocol(url) in ("s3", "s3a") else {}


def read_bytes(url: str) -> bytes:
    """The whole file, in one GET on object stores; FileNotFoundError when it is missing."""
    fs, path = filesystem(url)
    return fs.cat_file(path, **_small_file_kwargs(url))


def read_text(url: str) -> str:
    return read_bytes(url).decode("utf-8")


def size(url: str) -> int:
    fs, path = filesystem(url)
    return int(fs.size(path))


def sizes(url: str) -> dict[str, int]:
    """Base name → size in bytes of every file directly in folder ``url`` (one listing call)."""
    return {
        os.path.basename(e["name"].rstrip("/")): int(e.get("size") or 0)
        for e in _entries(url)
        if e.get("type") == "file"
    }


def move(src: str, dst: str) -> None:
    """Move one file (same filesystem): a rename locally, copy + delete on object stores."""
    fsys, path = filesystem(src)
    _, target = filesystem(dst)
    parent = target.rsplit("/", 1)[0]
    _written(fsys, path)
    _written(fsys, target)
    if isinstance(fsys, LocalFileSystem):
        os.makedirs(parent, exist_ok=True)
        os.replace(path, target)
        return
    fsys.mv(path, target)


def remove(url: str) -> None:
    fs, path = filesystem(url)
    _written(fs, path)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def open_read(url: str) -> IO[bytes]:
    fs, path = filesystem(url)
    return fs.open(path, "rb")


def temp_name(path: str) -> str:
    """The hidden, unique name a file is written under beside ``path`` before it is renamed
    (``.NAME.tmp-XXXXXXXX``: readers' globs and the start-up clean-up know this pattern)."""
    return f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}"


def _local_temp(path: str) -> str:
    """A temp path beside local ``path``, its folder created."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, temp_name(path))


@contextlib.contextmanager
def atomic_open(url: str) -> Iterator[IO[bytes]]:
    """Open ``url`` for binary writing; the file appears under its name only if the block succeeds."""
    fs, path = filesystem(url)
    _written(fs, path)
    if isinstance(fs, LocalFileSystem):
        tmp = _local_temp(path)
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
    if protocol(url) in OBJECT_STORES:
        # The object appears at close (one PUT, or CompleteMultipartUpload for big files); on
        # an error the upload is aborted and never committed.
        f = fs.open(path, "wb")
        try:
            yield f
            f.close()  # the commit
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()  # aborts a multipart upload (s3fs, gcsfs)
            f.closed = True  # and never commit what was buffered, not even at garbage collection
            raise
        return
    # Other remote filesystems (sftp, hdfs…): a temp name beside the target, then a rename.
    tmp = join(os.path.dirname(path), temp_name(path))
    try:
        with fs.open(tmp, "wb") as f:
            yield f
        fs.mv(tmp, path)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


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
    _written(fsys, path)
    if isinstance(fsys, LocalFileSystem):
        tmp = _local_temp(path)
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
    # GCS: gcsfs sends mode="create" as the ifGenerationMatch=0 precondition, which GCS enforces
    # (the emulator in the tests does not, so the race is tested on local disks and S3 only).
    return bool(names & {"LocalFileSystem", "S3FileSystem", "GCSFileSystem", "MemoryFileSystem"})


def ls_fresh(url: str) -> list[str]:
    """Base names in folder ``url``, bypassing any listing cache (object stores cache listings;
    a lock must see what another process wrote a moment ago). Temp files included. Inside a
    `ListingSnapshot` the snapshot's listing is used: it is as fresh as the phase it covers."""
    return sorted(os.path.basename(e["name"].rstrip("/")) for e in _entries(url))


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
