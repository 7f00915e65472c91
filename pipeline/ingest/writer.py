"""Turn a stream of raw samples into complete image shards + meta shards + status records.

Sources (folder, wds, urls, sam, pixart) only enumerate `RawSample`s in a deterministic order;
this module owns keys-already-present skipping, shard assignment, parallel decode/encode and the
atomic, resumable shard writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import re
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from pipeline import fs, images
from pipeline.errors import UserError, WriteStopped
from pipeline.store import Store, meta_table, sha256_bytes, shard_name, write_tar

log = logging.getLogger(__name__)
_SLUG = re.compile(r"[^A-Za-z0-9_-]+")


def make_key(name: str, identity: str) -> str:
    """A stable, readable, store-unique key: a slug of ``name`` plus a hash of ``identity``.

    Keys never contain dots (WebDataset splits member names at the first dot) or slashes.
    """
    slug = _SLUG.sub("_", name).strip("_")[:40] or "img"
    # surrogateescape: a POSIX file name that is not valid UTF-8 still hashes to its exact bytes.
    digest = hashlib.blake2b(identity.encode("utf-8", "surrogateescape"), digest_size=8).hexdigest()
    return f"{slug}-{digest}"


@dataclass
class RawSample:
    """One source item before decoding. Either ``data`` or ``file`` (a local path) gives the bytes;
    ``error`` set means the item is already known to be bad (it becomes an error row).

    A problem that does not cost the image (a malformed sidecar) goes into
    ``source_meta["sidecar_problem"]``; the summary counts it as a note.
    """

    key: str
    path: str
    data: bytes | None = None
    file: str | None = None
    error: str | None = None
    url: str | None = None
    alt_text: str | None = None
    label: str | None = None
    image_id: int | None = None
    n_masks: int | None = None
    source_meta: dict[str, Any] | None = None


@dataclass
class IngestConfig:
    shard_size: int = 1000
    max_side: int | None = None
    max_pixels: int = images.DEFAULT_MAX_PIXELS
    quality: int = 95
    workers: int = 1

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise UserError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.max_side is not None and self.max_side < 16:
            raise UserError(f"--max-side must be >= 16 pixels, got {self.max_side}")
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.max_pixels < 1:
            raise UserError(f"--max-pixels must be >= 1, got {self.max_pixels}")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality must be in 1..100, got {self.quality}")


@dataclass
class IngestSummary:
    source: str
    added: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)
    notes: Counter = field(default_factory=Counter)
    skipped_existing: int = 0
    duplicates: int = 0  # the same key twice within the source
    retried: int = 0  # error rows read again (--retry-errors)
    shards: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.added / self.seconds if self.seconds else 0.0
        out = [
            f"ingest {self.source}: {self.added} new samples in {len(self.shards)} shard(s) "
            f"({self.ok} ok, {sum(self.errors.values())} errors), {rate:.1f} samples/s",
        ]
        if self.skipped_existing:
            out.append(f"  skipped {self.skipped_existing} already in the store")
        if self.duplicates:
            out.append(
                f"  skipped {self.duplicates} duplicate key(s) within the source (same name twice)"
            )
        if self.retried:
            out.append(f"  retried {self.retried} earlier error row(s) (--retry-errors)")
        if not self.added and not self.skipped_existing:
            out.append("  the source held no images")
        elif not self.added:
            out.append("  nothing new: the store already holds every sample of this source")
        for reason, n in self.errors.most_common():
            out.append(f"  error  {n:>7}  {reason}")
        for reason, n in self.notes.most_common():
            out.append(f"  note   {n:>7}  {reason} (image kept)")
        return out


def error_category(reason: str) -> str:
    """Group error reasons for summaries: the text before the first ':'."""
    return reason.split(":", 1)[0].strip()


def process(raw: RawSample, cfg: IngestConfig) -> tuple[dict[str, Any], dict[str, bytes] | None]:
    """Decode and normalise one sample: (meta row, tar files or None for an error row)."""
    row: dict[str, Any] = {
        "key": raw.key,
        "path": raw.path,
        "url": raw.url,
        "alt_text": raw.alt_text,
        "label": raw.label,
        "image_id": raw.image_id,
        "n_masks": raw.n_masks,
        "source_meta": json.dumps(raw.source_meta, sort_keys=True) if raw.source_meta else None,
    }
    try:
        if raw.error:
            raise images.ImageError(raw.error)
        data = raw.data
        if data is None:
            try:
                with open(raw.file, "rb") as f:  # type: ignore[arg-type]
                    data = f.read()
            except OSError as e:
                raise images.ImageError(f"unreadable file: {e.strerror or e}") from None
        row["sha256"] = sha256_bytes(data)
        stored, ext, info = images.prepare(data, cfg.max_side, cfg.max_pixels, cfg.quality)
    except images.ImageError as e:
        row.update(status="error", error=str(e))
        return row, None
    row.update(
        status="ok",
        format=ext,
        bytes=len(stored),
        width=info["width"],
        height=info["height"],
        orig_width=info["orig_width"],
        orig_height=info["orig_height"],
    )
    if raw.source_meta and raw.source_meta.get("sidecar_problem"):
        row["_note"] = error_category(str(raw.source_meta["sidecar_problem"]))
    sidecar = {
        k: v
        for k, v in row.items()
        if v is not None and k not in ("status", "source_meta") and not k.startswith("_")
    }
    if raw.source_meta:
        sidecar["source_meta"] = raw.source_meta
    files = {ext: stored, "json": json.dumps(sidecar, sort_keys=True).encode()}
    if raw.alt_text:
        files["txt"] = raw.alt_text.encode("utf-8")
    return row, files


class _Processor:
    """Picklable callable for the worker pool."""

    def __init__(self, cfg: IngestConfig):
        self.cfg = cfg

    def __call__(self, raw: RawSample):
        return process(raw, self.cfg)


def _one_line(e: OSError) -> str:
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    return f"{where}{e.strerror or e}"


def key_index(store: Store) -> dict[str, str]:
    """Every key in the store → its row status (``ok`` or ``error``), from the meta shards."""
    out: dict[str, str] = {}
    for shard in store.shards():
        t = store.read_meta(shard, ["key", "status"])
        out.update(zip(t["key"].to_pylist(), t["status"].to_pylist(), strict=True))
    return out


def existing_keys(store: Store) -> set[str]:
    return set(key_index(store))


def ingest(
    store: Store,
    samples: Iterable[RawSample],
    source: str,
    cfg: IngestConfig,
    settings: dict[str, Any] | None = None,
    progress: bool = True,
    retry_errors: bool = False,
) -> IngestSummary:
    """Ingest ``samples`` into ``store``: new keys only, in new shards, each written atomically.

    Holds the store's ingest lease throughout (a second ingest is refused, naming this one), so
    shard numbers are never taken twice. ``retry_errors``: keys stored as error rows are read
    from the source again; the new row goes to a new shard and the old error row is dropped.
    """
    start = time.perf_counter()
    store.check_root()
    summary = IngestSummary(source=source)
    # Decode processes are forked before the lease's renewal thread starts (forking while a
    # thread holds a lock can leave the child stuck on it).
    pool = None
    if cfg.workers > 1:
        ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
        pool = ctx.Pool(cfg.workers)
    try:
        _ingest_locked(store, samples, source, cfg, settings, progress, retry_errors, pool, summary)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    summary.seconds = time.perf_counter() - start
    return summary


def _ingest_locked(
    store: Store,
    samples: Iterable[RawSample],
    source: str,
    cfg: IngestConfig,
    settings: dict[str, Any] | None,
    progress: bool,
    retry_errors: bool,
    pool,
    summary: IngestSummary,
) -> None:
    """`ingest` under the store's ingest lease."""
    from pipeline.lease import INGEST
    from pipeline.repair import clean_ingest, drop_superseded_errors

    start = time.perf_counter()
    with store.lease(INGEST) as lease:
        store.create()
        # (ingest writes its records itself: no other process writes them)
        with store.writing(INGEST, lease=lease):
            for line in clean_ingest(store):
                log.warning("%s", line)
            done = store.shards()
            next_index = int(done[-1]) + 1 if done else 0
            stored = key_index(store)
            retry = {k for k, st in stored.items() if st != "ok"} if retry_errors else set()
            seen: set[str] = set()

            def fresh() -> Iterator[RawSample]:
                for s in samples:
                    if s.key in seen:  # the same key twice in one source is ingested once
                        summary.duplicates += 1
                        continue
                    seen.add(s.key)
                    if s.key in stored and s.key not in retry:
                        summary.skipped_existing += 1
                        continue
                    if s.key in retry:
                        summary.retried += 1
                    yield s

            bar = tqdm(desc=f"ingest {source}", unit="img", disable=not progress, smoothing=0.05)
            try:
                if pool is not None:
                    results = _bounded_imap(pool, _Processor(cfg), fresh(), window=8 * cfg.workers)
                else:
                    results = map(_Processor(cfg), fresh())
                batch: list[tuple[dict, dict | None]] = []
                for item in results:
                    batch.append(item)
                    bar.update(1)
                    if len(batch) >= cfg.shard_size:
                        lease.check()
                        _write_shard(
                            store, shard_name(next_index), batch, source, cfg, settings, summary
                        )
                        next_index += 1
                        batch = []
                if batch:
                    lease.check()
                    _write_shard(
                        store, shard_name(next_index), batch, source, cfg, settings, summary
                    )
                if summary.retried:
                    drop_superseded_errors(store)
            except OSError as e:
                summary.seconds = time.perf_counter() - start
                raise WriteStopped(
                    f"writing to {store.root} failed ({_one_line(e)}); the {len(summary.shards)} "
                    "shard(s) written are kept; fix the cause and re-run the same command to add the rest",
                    summary,
                    e.errno,
                ) from e
            finally:
                bar.close()
                try:
                    store.refresh_manifest()
                except OSError as e:  # disk full: the records are safe, the manifest is derived
                    log.warning("manifest.json not updated (%s); any later run rebuilds it", e)


def _bounded_imap(pool, fn: Callable, items: Iterable, window: int) -> Iterator:
    """``pool.imap`` in order, but with at most ``window`` items in flight.

    ``Pool.imap`` drains its input in a feeder thread as fast as it can; a source that carries
    image bytes (a tar, a download) would then sit in memory whole. Here the source is read only
    as fast as the workers finish.
    """
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _write_shard(
    store: Store,
    shard: str,
    batch: list[tuple[dict, dict | None]],
    source: str,
    cfg: IngestConfig,
    settings: dict[str, Any] | None,
    summary: IngestSummary,
) -> None:
    t0 = time.perf_counter()
    rows = []
    samples = []
    errors: Counter = Counter()
    notes: Counter = Counter()
    for row, files in batch:
        if row.get("_note"):
            notes[row.pop("_note")] += 1
        row["shard"] = shard
        row["source"] = source
        rows.append(row)
        if files is None:
            errors[error_category(row["error"])] += 1
        else:
            samples.append((row["key"], files))
    checksum = write_tar(store.image_url(shard), samples)
    meta_checksum = fs.write_parquet(store.meta_url(shard), meta_table(rows))
    store.write_status(
        "ingest",
        shard,
        {
            "rows": len(rows),
            "ok": len(samples),
            "errors": sum(errors.values()),
            "errors_by_reason": dict(errors),
            "notes_by_reason": dict(notes),
            "source": source,
            "checksum": checksum,
            "meta_checksum": meta_checksum,
            "settings": {**asdict(cfg), **(settings or {})},
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )
    summary.shards.append(shard)
    summary.added += len(rows)
    summary.ok += len(samples)
    summary.errors.update(errors)
    summary.notes.update(notes)
