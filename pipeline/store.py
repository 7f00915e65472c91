"""The store: shard-aligned image shards, Parquet tables, per-shard status records and the manifest.

Layout (see ARCHITECTURE.md)::

    STORE/manifest.json               derived summary, written only by drivers
    STORE/images/000000.tar           WebDataset shard: <key>.<ext> + <key>.json
    STORE/meta/000000.parquet         one row per ingested sample (ok or error)
    STORE/<kind>/<tag>/000000.*       stage outputs, same shard numbering
    STORE/_status/ingest/000000.json  ingest status record: the shard is complete iff this exists
    STORE/_status/<kind>/<tag>/000000.json
    STORE/_status/<kind>/<tag>/config.json   resolved settings of that stage/tag

Bookkeeping lives under ``_status/``, outside the data folders, so that pyarrow, polars and
duckdb reading a whole folder (``pl.read_parquet("STORE/meta")``) see only the Parquet shards.

Workers write their output file(s), then the status record (each atomically). The manifest is
rebuilt from status records by drivers, so a crash between a shard's write and the manifest
update loses nothing, and concurrent workers never race on a shared file.

Reading a stage's state must not cost one request per shard (25,000 shards × 8 stages on S3
would be hours of GETs). Each stage folder therefore holds a **status index**,
``_status/<stage>/_index.json.gz``: every record of the stage plus the listing fingerprint
(ETag/size/mtime) it was read under. The records stay the truth: a reader lists the folder (one
request per 1,000 records), re-reads only the records whose fingerprint is new or changed
(concurrently), and drops those that vanished. A Store keeps its indexes in memory, so a second
look in the same process costs only the listing; drivers persist changed indexes when they
refresh the manifest, and nothing else writes them (read-only commands keep working on a
read-only copy).

Even a listing is one request per 1,000 records, so on object stores a stage's state is read
from its index alone when the index is **sealed** (``status reads = index``, the default there):

- a writer — a stage run, ingest, dedup, repair, each under its lease — first puts a marker
  ``_status/<stage>/_writing.json`` in the folder, and when it ends (its workers all finished)
  lists the records once more, writes the index with ``"sealed": true`` and removes the marker;
- a reader makes one prefix listing of the folder's ``_`` names (the index and the marker, one
  request whatever the shard count): no marker and a sealed index → the index is the state;
  a marker (a writer running, or killed) or an unsealed index → the listing above, as locally.

So the records stay what the index is rebuilt from, and a crashed writer's records are never
missed; what a sealed index cannot see is a record changed *by hand* after the seal:
``manifest verify`` (which always lists) reports it and ``manifest repair`` re-seals from the
records. Local stores list by default (cheap there); ``ALPHASET_STATUS_READS=list|index``
chooses for any store, and ``list`` restores the listing everywhere.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gzip
import hashlib
import io
import json
import logging
import os
import re
import socket
import tarfile
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline import __version__, fs

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUS_DIR = "_status"
QUARANTINE_DIR = "_quarantine"
CONFIG_NAME = "config.json"
INDEX_NAME = "_index.json.gz"
INDEX_VERSION = 1
# Below this many records a stage keeps no index object: reading them (concurrently) costs about
# one round trip, as the index would, and a small store stays a few files smaller.
INDEX_MIN_RECORDS = 100
WRITING_NAME = "_writing.json"  # a writer of the stage is running (or was killed): list it
STATUS_READS_ENV = "ALPHASET_STATUS_READS"
STATUS_READS = ("list", "index")
_RECORD_NAME = re.compile(r"^(\d+)\.json$")
# What manifest.json keeps of each status record.
_MANIFEST_INGEST_FIELDS = ("rows", "ok", "errors", "source", "checksum", "time")
_MANIFEST_STAGE_FIELDS = ("rows", "ok", "errors", "checksum", "time")
STAGE_KINDS = ("captions", "scores", "embeddings", "features", "edges")

# One schema for every meta shard, whatever the source, so a folder of shards reads as one table.
META_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),  # reason, null when ok
        ("source", pa.string()),  # folder | wds | urls | sam | pixart
        ("path", pa.string()),  # original path (relative to the source root) or tar member
        ("url", pa.string()),
        ("format", pa.string()),  # stored extension: jpg | png | webp
        ("width", pa.int32()),  # stored image size
        ("height", pa.int32()),
        ("orig_width", pa.int32()),  # size before --max-side, after EXIF orientation
        ("orig_height", pa.int32()),
        ("bytes", pa.int64()),  # stored image bytes
        ("sha256", pa.string()),  # of the original source bytes: exact-duplicate detection
        ("alt_text", pa.string()),  # original caption (sidecar .txt, wds caption, url list, prompt)
        ("label", pa.string()),  # class label (--label-from-dir)
        ("image_id", pa.int64()),  # SA-1B image id
        ("n_masks", pa.int32()),  # SA-1B annotation count
        ("source_meta", pa.string()),  # JSON text of any source metadata
    ]
)


class StoreError(Exception):
    """A store that is missing, malformed or inconsistent with the request."""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def shard_name(index: int) -> str:
    return f"{index:06d}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_url(url: str) -> str:
    h = hashlib.sha256()
    with fs.open_read(url) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def meta_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Build a meta table with the fixed schema from row dicts (missing fields become null)."""
    cols = {name: [r.get(name) for r in rows] for name in META_SCHEMA.names}
    return pa.table(cols, schema=META_SCHEMA)


@dataclass
class Store:
    """A store rooted at ``root`` (a local path or any fsspec URL)."""

    root: str
    # How a stage's state is read: "list" (its folder, always) or "index" (its sealed index when
    # there is one; see the module docstring). None: $ALPHASET_STATUS_READS, else "list" on a
    # local disk and "index" on an object store.
    reads: str | None = None

    def __post_init__(self) -> None:
        self.root = self.root.rstrip("/")
        if self.reads is None:
            self.reads = os.environ.get(STATUS_READS_ENV, "").strip() or (
                "list" if fs.is_local(self.root) else "index"
            )
        if self.reads not in STATUS_READS:
            raise StoreError(
                f"{STATUS_READS_ENV}={self.reads!r}: expected one of {', '.join(STATUS_READS)}"
            )
        # In-process caches (never pickled): status indexes by stage, the background refresh.
        self._indexes: dict[str, _StageIndex] = {}
        self._writing: dict[str, Writing] = {}  # the stages this process writes, under lease
        self._lock = threading.RLock()  # index updates: a background refresh and the caller
        self._refresher: threading.Thread | None = None
        self._refresher_lock = threading.Lock()
        self._bucket_checked = False

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "reads": self.reads}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.root = state["root"]
        self.reads = state.get("reads")
        self.__post_init__()

    def _check_bucket(self) -> None:
        if not self._bucket_checked:
            fs.check_bucket(self.root)
            self._bucket_checked = True

    # ---- paths -------------------------------------------------------------------------------
    def url(self, *parts: str) -> str:
        return fs.join(self.root, *parts)

    @property
    def manifest_url(self) -> str:
        return self.url("manifest.json")

    def image_url(self, shard: str) -> str:
        return self.url("images", f"{shard}.tar")

    def meta_url(self, shard: str) -> str:
        return self.url("meta", f"{shard}.parquet")

    def stage_dir(self, stage: str) -> str:
        """``stage`` is ``ingest`` or ``<kind>/<tag>`` (e.g. ``captions/llava-1.5-7b``)."""
        return self.url("meta") if stage == "ingest" else self.url(stage)

    def status_dir(self, stage: str) -> str:
        """Where the status records and the config of ``stage`` live (``STORE/_status/<stage>``)."""
        return self.url(STATUS_DIR, stage)

    def status_url(self, stage: str, shard: str) -> str:
        return fs.join(self.status_dir(stage), shard + ".json")

    # ---- existence ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return fs.exists(self.manifest_url)

    def check_root(self) -> None:
        """A `StoreError` naming the path when the store root is a file (or under one)."""
        self._check_bucket()  # an object store's bucket must exist: never created by accident
        fsys, path = fs.filesystem(self.root)
        try:
            if fsys.exists(path) and not fsys.isdir(path):
                raise StoreError(f"--store {self.root} is a file, not a store folder")
        except NotADirectoryError:
            raise StoreError(
                f"--store {self.root}: a parent of it is a file, not a folder"
            ) from None

    def create(self) -> None:
        """Create an empty store (idempotent). On an object store the bucket must exist."""
        self.check_root()
        if not self.exists():
            try:
                fs.makedirs(self.root)
            except (FileExistsError, NotADirectoryError) as e:
                raise StoreError(f"--store {self.root}: cannot create the folder ({e})") from None
            self.write_manifest(self._empty_manifest())

    def require(self) -> None:
        self._check_bucket()
        if not self.exists():
            raise StoreError(
                f"no store at {self.root} (no manifest.json); create one with 'alphaset ingest … --store {self.root}'"
            )

    # ---- status records ----------------------------------------------------------------------
    def output_names(self, stage: str, shard: str, record: dict[str, Any]) -> dict[str, str]:
        """The files a status record vouches for, by their size field in the record:
        ``{"output_bytes": "captions/tiny/000003.parquet"}``; for ingest the tar and the meta."""
        if stage == "ingest":
            return {
                "image_bytes": f"images/{shard}.tar",
                "meta_bytes": f"meta/{shard}.parquet",
            }
        default = f"{shard}.tar" if stage.startswith("features/") else f"{shard}.parquet"
        return {"output_bytes": f"{stage}/{record.get('output') or default}"}

    def write_status(self, stage: str, shard: str, record: dict[str, Any]) -> dict[str, Any]:
        """Write the status record that marks ``shard`` of ``stage`` complete. Call it last.

        The size of each output file is recorded too (``output_bytes``; ``image_bytes`` and
        ``meta_bytes`` for ingest), so a re-run skips a done shard only when its file is there
        with that size — a cheap check against deleted or truncated outputs.
        """
        rec = {
            "stage": stage,
            "shard": shard,
            "tool_version": __version__,
            "time": now_iso(),
            **record,
        }
        for size_field, rel in self.output_names(stage, shard, rec).items():
            if size_field not in rec and fs.exists(self.url(rel)):
                rec[size_field] = fs.size(self.url(rel))
        fs.atomic_write(self.status_url(stage, shard), json.dumps(rec, indent=1, sort_keys=True))
        self._touched(stage)
        return rec

    def remove_status(self, stage: str, shard: str) -> None:
        """Delete the status record of ``shard``: the shard reads as not done (its writer holds
        the stage's lease)."""
        fs.remove(self.status_url(stage, shard))
        self._touched(stage)

    def _touched(self, stage: str) -> None:
        """This process changed a record of ``stage``: its in-memory index is no longer the
        state without a listing."""
        idx = self._indexes.get(stage)
        if idx is not None:
            idx.trusted = False

    def status(self, stage: str, shard: str) -> dict[str, Any] | None:
        try:
            return _load_record(self.status_url(stage, shard))
        except FileNotFoundError:
            return None

    def completed(
        self, stage: str, problems: list[tuple[str, str]] | None = None
    ) -> dict[str, dict[str, Any]]:
        """All status records of a stage, by shard name: what the store holds now, read through
        the stage's status index (a listing plus the records that changed since).

        An unreadable record is a `StoreError` naming the file (and ``manifest repair``), unless
        ``problems`` is given: then it is listed there as ``(url, message)`` and left out.
        """
        with self._lock:
            return dict(self._index(stage, problems).records)

    def completed_all(self) -> dict[str, dict[str, dict[str, Any]]]:
        """`completed` of ``ingest`` and of every stage, the listings run concurrently (on S3 a
        listing is a round trip per 1,000 records; nine stages need not wait for each other)."""
        stages = ["ingest", *self.stages()]
        with self._lock, ThreadPoolExecutor(min(8, len(stages))) as pool:
            indexes = list(pool.map(self._index, stages))
            return {stage: dict(idx.records) for stage, idx in zip(stages, indexes, strict=True)}

    def _index(self, stage: str, problems: list[tuple[str, str]] | None = None) -> _StageIndex:
        """Bring the in-memory index of ``stage`` up to date with the records (caller holds the
        lock). A record that does not parse stays out of the index (and is read again next time).
        ``problems`` (verify, repair): always from the listing, never a sealed index alone."""
        if problems is None and self._sealed_state(stage):
            return self._indexes[stage]
        folder = self.status_dir(stage)
        writer = self._writing.get(stage)
        # Read before listing: only a listing that starts after every worker has finished is
        # final (a background refresh may be listing while the run ends).
        final = writer is not None and writer.finished
        names = fs.listing(folder)
        idx = self._indexes.get(stage)
        if idx is None:
            idx = self._load_index(stage) if INDEX_NAME in names else _StageIndex()
            idx.index_mark = names.get(INDEX_NAME)
            self._indexes[stage] = idx
        # A listing taken while nobody writes (this process writes the stage, its workers are
        # done or not started) is the state until this process writes again.
        if final:
            writer.dispatched = False
        idx.trusted = writer is not None and not writer.dispatched
        marks = {m.group(1): fp for n, fp in names.items() if (m := _RECORD_NAME.match(n))}
        gone = [s for s in idx.marks if s not in marks]
        changed = [s for s, fp in marks.items() if idx.marks.get(s) != fp]
        for s in gone:
            del idx.records[s], idx.marks[s]
        if changed:
            urls = {fs.join(folder, s + ".json"): s for s in changed}
            got = fs.read_many(list(urls))
            for url, data in got.items():
                try:
                    rec = _parse_record(url, data)
                except StoreError as e:
                    idx.records.pop(urls[url], None)
                    idx.marks.pop(urls[url], None)
                    idx.dirty = True
                    if problems is None:
                        raise
                    problems.append((url, str(e)))
                    continue
                idx.records[urls[url]] = rec
                idx.marks[urls[url]] = marks[urls[url]]
            log.debug("%s: %d status record(s) read, %d gone", stage, len(got), len(gone))
        if gone or changed:
            idx.dirty = True
        return idx

    def _index_head(self, stage: str) -> tuple[str | None, bool]:
        """(fingerprint of the stage's index object or None, whether a writer's marker is up):
        one prefix listing of the folder's ``_`` names, whatever the shard count."""
        marks = fs.listing(self.status_dir(stage), stem="_")
        return marks.get(INDEX_NAME), WRITING_NAME in marks

    def _sealed_state(self, stage: str) -> bool:
        """Whether the in-memory index of ``stage`` is its state without a listing: read from a
        sealed index object while no writer's marker is in the folder (one prefix listing; the
        index object is read again only when it changed). See the module docstring."""
        if self.reads != "index":
            return False
        idx = self._indexes.get(stage)
        writer = self._writing.get(stage)
        if writer is not None:  # this process holds the stage's lease and checked on entry
            return idx is not None and idx.trusted and not writer.dispatched
        mark, writing = self._index_head(stage)
        if writing or mark is None:
            if idx is not None:
                idx.trusted = False
            return False
        if idx is not None and idx.index_mark == mark and (idx.trusted or not idx.sealed):
            return idx.trusted  # this version was read already: sealed and current, or unsealed
        # (A sealed version read while a marker was up is the state now that it is gone: the
        # writer changed nothing, else it would have written a new version.)
        loaded = self._load_index(stage)
        loaded.index_mark = mark
        loaded.trusted = loaded.sealed
        if idx is None or loaded.sealed:
            self._indexes[stage] = loaded
        else:  # unsealed: the listing that follows brings idx up to date
            idx.index_mark, idx.sealed = mark, False
        return loaded.sealed

    def _load_index(self, stage: str) -> _StageIndex:
        url = fs.join(self.status_dir(stage), INDEX_NAME)
        try:
            doc = json.loads(gzip.decompress(fs.read_bytes(url)))
        except FileNotFoundError:
            return _StageIndex()
        except (OSError, EOFError, ValueError) as e:  # a damaged index is rebuilt from the records
            log.warning("%s unreadable (%s); rebuilding it from the status records", url, e)
            return _StageIndex()
        if doc.get("version") != INDEX_VERSION:
            return _StageIndex()
        return _StageIndex(
            records=doc["records"],
            marks=doc["marks"],
            dirty=False,
            sealed=bool(doc.get("sealed")),
        )

    def _save_index(self, stage: str, sealed: bool = False) -> None:
        """Persist the index of ``stage`` if it changed since it was read (drivers only);
        ``sealed`` only by the writer of the stage, its workers finished (`writing`)."""
        idx = self._indexes.get(stage)
        if idx is None:
            return
        url = fs.join(self.status_dir(stage), INDEX_NAME)
        if len(idx.records) < INDEX_MIN_RECORDS:
            # A small stage keeps no index: not even a sealed one from when it was big.
            if sealed and (idx.index_mark is not None or idx.saved):
                fs.remove(url)
                idx.index_mark, idx.sealed, idx.saved = None, False, False
            return
        if not idx.dirty and (idx.sealed or not sealed):
            return  # unchanged (a reader never unseals an index it did not change)
        if (
            not sealed
            and stage not in self._writing
            and self._index_head(stage)[0] != idx.index_mark
        ):
            return  # written by someone else since this process read it (maybe sealed)
        doc = {
            "version": INDEX_VERSION,
            "stage": stage,
            "written": now_iso(),
            "sealed": sealed,
            "records": idx.records,
            "marks": idx.marks,
        }
        data = gzip.compress(json.dumps(doc, sort_keys=True).encode(), compresslevel=5)
        fs.atomic_write(url, data)
        idx.dirty, idx.sealed, idx.index_mark, idx.saved = False, sealed, None, True
        if stage not in self._writing:  # the version this reader wrote, for its next save
            idx.index_mark = self._index_head(stage)[0]

    @contextlib.contextmanager
    def writing(self, stage: str, dispatched: bool = False, lease: Any = None) -> Iterator[Writing]:
        """Mark ``stage`` as being written by this process (call it under the stage's lease):
        the ``_writing.json`` marker makes readers list the folder meanwhile; on a normal exit
        the records are listed once more, the index is written sealed and the marker removed.
        On an exception the marker stays (as after a kill): readers keep listing until the next
        writer of the stage seals it. ``dispatched``: records may be written by other processes
        from the start (else call `Writing.dispatch` before handing out work, and
        `Writing.finish` once it is all done). ``lease``: the stage's lease, checked before the
        seal (a writer whose lease was taken over seals nothing)."""
        w = Writing(dispatched=dispatched, lease=lease)
        marker = fs.join(self.status_dir(stage), WRITING_NAME)
        with self._lock:
            mark, killed = self._index_head(stage)
            idx = self._indexes.get(stage)
            if idx is None and self.reads == "index" and not killed and mark is not None:
                idx = self._load_index(stage)  # nothing read yet: start from a sealed index
                idx.trusted, idx.index_mark = idx.sealed, mark
                self._indexes[stage] = idx
            # Start from memory only when it is the sealed version in force now; else (a killed
            # writer's marker, a newer index, no index object) the writer lists the records.
            if idx is not None and not (
                idx.trusted and idx.sealed and not killed and mark is not None
                and idx.index_mark == mark
            ):  # fmt: skip
                idx.trusted = False
            # Object stores have no temp files (uploads appear whole): nothing half-written can
            # be among the records since the seal.
            w.sealed_clean = (
                idx is not None and idx.trusted and fs.protocol(self.root) in fs.OBJECT_STORES
            )
            info = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": now_iso(),
                "token": w.token,
            }
            fs.atomic_write(marker, json.dumps(info))
            self._writing[stage] = w
        ok = False
        try:
            yield w
            ok = True
        finally:
            with self._lock:
                self._writing.pop(stage, None)
                if ok:
                    self._seal(stage, w, marker)
                elif stage in self._indexes:
                    self._indexes[stage].trusted = False

    def sealed_index_drift(self, stage: str, records: dict[str, dict[str, Any]]) -> list[str]:
        """The shards whose status record (``records``: what the folder holds, listed) differs
        from the sealed index object of ``stage`` — gone, added or rewritten since the seal, by
        hand: what a reader trusting the index would get wrong. Empty when no sealed index is
        in force (none, unsealed, or a writer's marker in the folder)."""
        mark, writing = self._index_head(stage)
        if writing or mark is None:
            return []
        idx = self._load_index(stage)
        if not idx.sealed:
            return []
        return sorted(
            s for s in set(records) | set(idx.records) if records.get(s) != idx.records.get(s)
        )

    def sealed_clean(self, stage: str) -> bool:
        """Whether this process, writing ``stage``, began from its sealed index with no marker
        of a killed writer in the folder: nothing was left half-written there since the seal."""
        w = self._writing.get(stage)
        return w is not None and w.sealed_clean

    def _seal(self, stage: str, w: Writing, marker: str) -> None:
        """The end of `writing`: list the records if they may have changed since the last
        listing, write the index sealed, remove the marker. A failed write (disk full) leaves
        the marker: readers list."""
        self._writing[stage] = w  # the writer's view of its own stage, for this last look
        w.finished = True
        try:
            if w.lease is not None:
                w.lease.check(fresh=True)  # taken over after it expired: the new writer seals
            self._index(stage)
            self._save_index(stage, sealed=True)
            try:
                ours = _load_record(marker).get("token") == w.token
            except (FileNotFoundError, StoreError):  # gone or unreadable: not this writer's
                ours = False
            if ours:  # never another writer's marker
                fs.remove(marker)
        except (OSError, StoreError) as e:
            log.warning("%s: status index not sealed (%s); readers list the records", stage, e)
        finally:
            self._writing.pop(stage, None)
            if stage in self._indexes:  # the next writer or reader checks the index again
                self._indexes[stage].trusted = False

    def shards(self) -> list[str]:
        """Ingested (complete) shard names, in order."""
        return sorted(self.completed("ingest"))

    def stages(self) -> list[str]:
        """Every ``<kind>/<tag>`` present in the store."""
        out = []
        present = set(fs.ls(self.url(STATUS_DIR)))  # one listing instead of one per kind
        for kind in (k for k in STAGE_KINDS if k in present):
            for tag in fs.ls(self.url(STATUS_DIR, kind)):
                if not tag.startswith((".", "_")):
                    out.append(f"{kind}/{tag}")
        return out

    def quarantine(self, rel: str, stamp: str) -> str:
        """Move ``rel`` (a path inside the store) aside to ``_quarantine/<stamp>/<rel>``, where no
        reader looks; return the new relative path. Nothing is deleted: the user decides."""
        dst = f"{QUARANTINE_DIR}/{stamp}/{rel}"
        fs.move(self.url(rel), self.url(dst))
        if rel.startswith(STATUS_DIR + "/"):
            self._touched(rel[len(STATUS_DIR) + 1 :].rsplit("/", 1)[0])
        return dst

    def lease(self, name: str, **kwargs: Any):
        """The writer lease ``name`` (``ingest`` or a ``<kind>/<tag>``) of this store."""
        from pipeline.lease import Lease

        self._check_bucket()
        return Lease(self.root, name, **kwargs)

    def leases(self, names: list[str], **kwargs: Any):
        """Several writer leases of this store, taken together (all or none)."""
        from pipeline.lease import Leases

        self._check_bucket()
        return Leases(self.root, names, **kwargs)

    # ---- stage config (resolved settings written beside the output) -------------------------
    def stage_config(self, stage: str) -> dict[str, Any] | None:
        try:
            return _load_record(fs.join(self.status_dir(stage), CONFIG_NAME))
        except FileNotFoundError:
            return None

    def claim_stage(self, stage: str, settings: dict[str, Any]) -> None:
        """Record the settings of ``stage``; refuse to mix outputs made with other settings."""
        old = self.stage_config(stage)
        if old is not None:
            if old.get("settings") != settings:
                diff = sorted(
                    k
                    for k in set(old["settings"]) | set(settings)
                    if old["settings"].get(k) != settings.get(k)
                )
                raise StoreError(
                    f"{stage} was started with other settings ({', '.join(diff)} differ); "
                    "resume with the same settings or choose another --tag"
                )
            return
        rec = {
            "stage": stage,
            "settings": settings,
            "tool_version": __version__,
            "created": now_iso(),
        }
        fs.atomic_write(
            fs.join(self.status_dir(stage), CONFIG_NAME), json.dumps(rec, indent=1, sort_keys=True)
        )

    # ---- reading shards ----------------------------------------------------------------------
    def read_meta(self, shard: str, columns: list[str] | None = None) -> pa.Table:
        try:
            return fs.read_parquet(self.meta_url(shard), columns=columns)
        except FileNotFoundError:
            raise StoreError(
                f"{self.meta_url(shard)} is missing but its ingest status record exists; "
                f"'alphaset manifest repair --store {self.root}' sets the shard aside so the next "
                "ingest of its source adds its samples again"
            ) from None

    def ok_keys(self, shard: str) -> list[str]:
        t = self.read_meta(shard, ["key", "status"])
        return [
            k
            for k, s in zip(t["key"].to_pylist(), t["status"].to_pylist(), strict=True)
            if s == "ok"
        ]

    def iter_images(self, shard: str) -> Iterator[tuple[str, str, bytes]]:
        """Yield ``(key, ext, image_bytes)`` for every image in the shard's tar, in tar order."""
        for key, files in iter_tar_samples(self.image_url(shard)):
            for ext in ("jpg", "png", "webp"):
                if ext in files:
                    yield key, ext, files[ext]
                    break

    # ---- manifest ----------------------------------------------------------------------------
    def _empty_manifest(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "created": now_iso(),
            "tool_version": __version__,
            "shards": {},
            "stages": {},
        }

    def read_manifest(self) -> dict[str, Any]:
        self._check_bucket()
        try:
            m = json.loads(fs.read_text(self.manifest_url))
        except FileNotFoundError:
            self.require()  # the one-line "no store at …" error
            raise
        except ValueError as e:
            raise StoreError(
                f"{self.manifest_url} is not valid JSON ({e}); rebuild it from the status records "
                f"with 'alphaset manifest repair --store {self.root}'"
            ) from None
        if not isinstance(m, dict):
            raise StoreError(
                f"{self.manifest_url} is not a manifest (a JSON object); rebuild it with "
                f"'alphaset manifest repair --store {self.root}'"
            )
        if m.get("schema_version") != SCHEMA_VERSION:
            raise StoreError(
                f"{self.manifest_url} has schema version {m.get('schema_version')}, this alphaset reads {SCHEMA_VERSION}"
            )
        return m

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        manifest["updated"] = now_iso()
        fs.atomic_write(self.manifest_url, json.dumps(manifest, indent=1, sort_keys=True))

    def refresh_manifest(
        self, stages: list[str] | None = None, background: bool = False
    ) -> dict[str, Any] | None:
        """Rebuild the manifest's shard and stage tables from the status records (drivers only).

        Reads each stage through its status index and persists the indexes that changed; the
        manifest is rewritten only when its tables changed. ``stages`` limits the listing to the
        stages a run could have changed (``["captions/tiny"]``; ``"ingest"`` for the shard table):
        the others keep what this Store read of them during the run, else the manifest's entry.
        None (the default) re-reads every stage. ``background=True`` starts the
        refresh in a thread and returns at once (None), so a scheduling loop never waits on the
        store; a later blocking call waits for it first. A manifest that cannot be read is rebuilt
        from scratch: it holds nothing the status records do not (its ``created`` time is the
        only loss).
        """
        if background:
            with self._refresher_lock:
                if self._refresher is None or not self._refresher.is_alive():
                    self._refresher = threading.Thread(
                        target=self._refresh_logged,
                        args=(stages,),
                        name="manifest-refresh",
                        daemon=True,
                    )
                    self._refresher.start()
            return None
        if self._refresher is not None:
            self._refresher.join()
        return self._refresh(stages)

    def _refresh_logged(self, stages: list[str] | None) -> None:
        try:
            self._refresh(stages)
        except Exception as e:  # a background refresh retries at the next call; never fatal
            log.warning("manifest refresh failed (the next one retries): %s", e)

    def _refresh(self, only: list[str] | None = None) -> dict[str, Any]:
        with self._lock:
            try:
                m = self.read_manifest()
            except StoreError:
                self._check_bucket()
                m = self._empty_manifest()
            present = self.stages()
            if only is None:
                relist = ["ingest", *present]
            else:
                relist = [s for s in ("ingest", *present) if s in only]
            if relist:
                with ThreadPoolExecutor(min(8, len(relist))) as pool:  # listings in parallel
                    list(pool.map(self._index, relist))
            if "ingest" in self._indexes:
                shards = {
                    s: {k: r.get(k) for k in _MANIFEST_INGEST_FIELDS}
                    for s, r in sorted(self._indexes["ingest"].records.items())
                }
            else:
                shards = m.get("shards", {})
            tables: dict[str, Any] = {}
            for stage in present:
                if stage not in self._indexes:
                    if stage in m.get("stages", {}):
                        tables[stage] = m["stages"][stage]
                        continue
                    self._index(stage)  # new since the manifest was written
                cfg = self.stage_config(stage) or {}
                tables[stage] = {
                    "settings": cfg.get("settings"),
                    "tool_version": cfg.get("tool_version"),
                    "created": cfg.get("created"),
                    "shards": {
                        s: {k: r.get(k) for k in _MANIFEST_STAGE_FIELDS}
                        for s, r in sorted(self._indexes[stage].records.items())
                    },
                }
            if m.get("shards") != shards or m.get("stages") != tables or "updated" not in m:
                m["shards"], m["stages"] = shards, tables
                self.write_manifest(m)
            for stage in list(self._indexes):
                # A stage this process writes is written sealed when it ends; until then only
                # the progress of workers elsewhere (dispatched) is worth persisting.
                w = self._writing.get(stage)
                if w is None or (w.dispatched and not w.finished):
                    self._save_index(stage)
            return m


@dataclass
class _StageIndex:
    """One stage's status records and the listing fingerprint each was read under."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    marks: dict[str, str] = field(default_factory=dict)
    dirty: bool = True  # differs from the persisted index object
    sealed: bool = False  # the persisted index object is sealed (complete when no marker)
    trusted: bool = False  # the records are the stage's state without a listing
    index_mark: str | None = None  # fingerprint of the index object these records came from
    saved: bool = False  # this process wrote an index object for the stage


@dataclass
class Writing:
    """A stage being written by this process (`Store.writing`)."""

    dispatched: bool = False  # other processes may be writing records now: always list
    finished: bool = False  # all of them are done: the next listing is final
    sealed_clean: bool = False  # began from a sealed index, no killed writer's marker
    lease: Any = None  # the stage's lease (checked before sealing)
    token: str = field(default_factory=lambda: uuid.uuid4().hex)  # names this writer's marker

    def dispatch(self) -> None:
        self.dispatched = True

    def finish(self) -> None:
        self.finished = True


def _load_record(url: str) -> dict[str, Any]:
    """A JSON record file (status record, stage config) as a dict; a `StoreError` naming the
    file when it is not one."""
    return _parse_record(url, fs.read_bytes(url))


def _parse_record(url: str, text: bytes) -> dict[str, Any]:
    try:
        rec = json.loads(text)
    except ValueError as e:
        rec = e
    if not isinstance(rec, dict):
        why = f"not valid JSON ({rec})" if isinstance(rec, ValueError) else "not a JSON object"
        raise StoreError(
            f"{url} is {why}; 'alphaset manifest repair' removes it so the shard is redone"
        )
    return rec


def iter_tar_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a WebDataset tar's members into samples: ``(key, {ext: bytes})``.

    The key is the member path up to the first dot of its base name, as in webdataset.
    Members with absolute or ``..`` paths are rejected (ValueError), never extracted.
    """
    with fs.open_read(url) as raw:
        yield from iter_tar_stream(raw)


def iter_tar_stream(
    stream, on_problem: Callable[[str], None] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """`iter_tar_samples` over an open binary stream.

    Without ``on_problem`` an unsafe member raises ValueError and other non-file members are
    skipped; with it, each unsafe or non-file member is reported through it and skipped, so a
    checker can list every problem of a tar instead of stopping at the first.
    """
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        current: str | None = None
        files: dict[str, bytes] = {}
        for member in tar:
            try:
                check_member_name(member.name)
            except ValueError as e:
                if on_problem is None:
                    raise
                on_problem(str(e))
                continue
            if not member.isfile():
                if on_problem is not None and not member.isdir():
                    on_problem(f"tar member {member.name!r} is not a regular file")
                continue
            base = member.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            prefix = member.name[: len(member.name) - len(base)]
            stem, ext = base.split(".", 1)
            key = prefix + stem
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if key != current:
                if current is not None:
                    yield current, files
                current, files = key, {}
            files[ext.lower()] = data
        if current is not None:
            yield current, files


def check_member_name(name: str) -> None:
    if name.startswith("/") or name.startswith("\\") or ".." in name.replace("\\", "/").split("/"):
        raise ValueError(f"unsafe tar member path {name!r} (absolute or '..')")


def write_tar(url: str, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    """Write ``[(key, {ext: bytes})]`` as a WebDataset tar, atomically; return its sha256."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0  # deterministic shards
                tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    fs.atomic_write(url, data)
    return sha256_bytes(data)
