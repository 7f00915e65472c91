"""Resumable, verified download of SA-1B tars from the links file Meta hands out.

Each tar downloads to ``<name>.part``; an interrupted transfer resumes with ``Range: bytes=N-``
(a server that answers 200 instead of 206 is restarted from zero, byte counts are checked against
Content-Length / Content-Range). The md5 is computed while the bytes arrive. A finished file is
verified — against the md5 list when one is given, else by reading the tar to its end-of-archive
marker — *before* it is renamed to its final name, so a file under its final name is always
complete. A marker ``.<name>.verified`` (size, mtime, md5) beside it lets a re-run skip it
without reading 11 GB again. Failures are per file: retried with backoff, then reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import re
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import requests
import urllib3
from tqdm import tqdm

from pipeline.errors import UserError
from sam_data.links import parse_links, parse_md5

log = logging.getLogger(__name__)

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_CONTENT_RANGE_UNSATISFIED = re.compile(r"^bytes \*/(\d+)$")
# 4xx answers that retrying will not fix (an expired signed link answers 403).
_RETRYABLE_4XX = {408, 425, 429}


@dataclass
class DownloadConfig:
    out: str
    workers: int = 4
    retries: int = 5  # failed attempts in a row that made no progress before giving up on a file
    backoff: float = 2.0  # seconds before the first retry, doubled each time (capped at 60 s)
    timeout: float = 60.0  # seconds to connect / between two received chunks
    chunk_size: int = 1 << 20

    def __post_init__(self) -> None:
        if "://" in self.out:
            raise UserError(f"--out must be a local folder, got {self.out}")
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.retries < 0:
            raise UserError(f"--retries must be >= 0, got {self.retries}")
        if self.backoff < 0 or self.timeout <= 0 or self.chunk_size < 1:
            raise UserError(
                f"backoff must be >= 0, timeout > 0 and chunk_size >= 1, got "
                f"{self.backoff}, {self.timeout}, {self.chunk_size}"
            )


@dataclass
class FileResult:
    name: str
    status: str  # downloaded | skipped | failed
    bytes: int = 0
    md5: str | None = None
    detail: str = ""  # how it was verified, or why it failed
    attempts: int = 0


@dataclass
class DownloadSummary:
    results: list[FileResult] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # non-tar rows of the links file
    not_selected: int = 0
    seconds: float = 0.0

    @property
    def failed(self) -> list[FileResult]:
        return [r for r in self.results if r.status == "failed"]

    def lines(self) -> list[str]:
        got = [r for r in self.results if r.status == "downloaded"]
        skipped = [r for r in self.results if r.status == "skipped"]
        nbytes = sum(r.bytes for r in got)
        rate = nbytes / self.seconds if self.seconds else 0.0
        out = [
            f"sam download: {len(got)} downloaded ({human_bytes(nbytes)}, {human_bytes(rate)}/s), "
            f"{len(skipped)} already complete, {len(self.failed)} failed"
            + (f"; {self.not_selected} not selected by --only" if self.not_selected else "")
        ]
        if self.ignored:
            out.append(f"  ignored non-image rows of the links file: {', '.join(self.ignored)}")
        for r in self.failed:
            out.append(f"  FAILED {r.name}: {r.detail}")
        if self.failed:
            out.append("  re-run the same command to retry; finished files are kept")
        return out


class _Retry(Exception):
    """A transfer problem worth another attempt (connection cut, 5xx, byte counts off)."""


class _Stopped(Exception):
    """The whole download was interrupted (Ctrl-C)."""


class _Fatal(Exception):
    """A problem retrying will not fix (expired link, md5 mismatch, corrupt tar)."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024:
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def download(
    links_path: str,
    out: str,
    only: list[str] | None = None,
    md5_path: str | None = None,
    workers: int = 4,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> DownloadSummary:
    """Download the image tars of an SA-1B links file into ``out`` (resumable, verified).

    ``only`` names tars (``sa_000001`` or ``sa_000001.tar``); default all. Per-file failures are
    in the summary (``summary.failed``), never raised; bad arguments and files raise ValueError.
    """
    start = time.perf_counter()
    cfg = DownloadConfig(
        out=out, workers=workers, retries=retries, backoff=backoff, timeout=timeout
    )
    links = parse_links(links_path)
    wanted = links.select(only)
    md5s = parse_md5(md5_path) if md5_path else {}
    os.makedirs(cfg.out, exist_ok=True)
    summary = DownloadSummary(ignored=links.ignored, not_selected=len(links.tars) - len(wanted))

    slots: queue.Queue[int] = queue.Queue()
    for i in range(min(cfg.workers, len(wanted))):
        slots.put(i + 1)
    overall = tqdm(
        total=len(wanted), desc="sam download", unit="file", disable=not progress, position=0
    )

    stop = threading.Event()  # Ctrl-C: running transfers stop at their next chunk, .part kept

    def one(item: tuple[str, str]) -> FileResult:
        name, url = item
        slot = slots.get()
        try:
            return download_file(
                name, url, cfg, md5s.get(name), progress=progress, position=slot, stop=stop
            )
        finally:
            slots.put(slot)
            overall.update(1)

    pool = ThreadPoolExecutor(max_workers=cfg.workers)
    try:
        futures = [pool.submit(one, item) for item in wanted.items()]
        summary.results = [f.result() for f in futures]
    except KeyboardInterrupt:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        overall.close()
    summary.seconds = time.perf_counter() - start
    return summary


def download_file(
    name: str,
    url: str,
    cfg: DownloadConfig,
    expected_md5: str | None = None,
    progress: bool = False,
    position: int = 0,
    stop: threading.Event | None = None,
) -> FileResult:
    """Download one tar to ``cfg.out/name``; never raises for a per-file problem.

    Setting ``stop`` ends the transfer at its next chunk (the .part file is kept for a resume).
    """
    final = os.path.join(cfg.out, name)
    part = final + ".part"
    marker = os.path.join(cfg.out, f".{name}.verified")
    # 1. Already complete? A valid marker skips it; a file without one is verified now.
    if os.path.exists(final):
        try:
            how = _check_existing(final, marker, expected_md5)
            return FileResult(name, "skipped", os.path.getsize(final), detail=how)
        except _Fatal as e:
            log.warning("%s: existing file failed verification (%s); downloading it again", name, e)
            _remove(final, marker)
    # 2. Transfer, resuming from the .part file, with bounded retries.
    hasher = _PartHasher(part)
    bar = tqdm(
        desc=name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        leave=False,
        disable=not progress,
        position=position,
    )
    attempts = fruitless = 0
    best = hasher.size
    try:
        with requests.Session() as session:
            while True:
                attempts += 1
                try:
                    _fetch_once(session, url, part, hasher, cfg, bar, stop)
                    break
                except (_Retry, requests.RequestException, urllib3.exceptions.HTTPError) as e:
                    reason = _short(e)
                except _Fatal as e:
                    return FileResult(name, "failed", detail=str(e), attempts=attempts)
                except _Stopped:
                    return FileResult(name, "failed", detail="interrupted; the .part file is kept")
                fruitless = 0 if hasher.size > best else fruitless + 1
                best = max(best, hasher.size)
                if fruitless > cfg.retries:
                    return FileResult(
                        name,
                        "failed",
                        detail=f"{reason} ({attempts} attempts; the .part file is kept)",
                        attempts=attempts,
                    )
                delay = min(cfg.backoff * 2 ** (fruitless - 1), 60.0) if fruitless else 0.0
                log.warning(
                    "%s: %s; retrying in %.1f s (%d bytes kept)", name, reason, delay, hasher.size
                )
                if (stop or threading.Event()).wait(delay):
                    return FileResult(name, "failed", detail="interrupted; the .part file is kept")
    finally:
        bar.close()
    # 3. Verify the finished .part, then publish it under the final name.
    md5 = hasher.hexdigest()
    size = hasher.size
    try:
        how = _verify(part, md5, expected_md5)
    except _Fatal as e:
        _remove(part)
        return FileResult(name, "failed", size, md5, f"{e}; the file was deleted", attempts)
    os.replace(part, final)
    _write_marker(final, marker, md5, how)
    return FileResult(name, "downloaded", size, md5, how, attempts)


def _fetch_once(
    session: requests.Session,
    url: str,
    part: str,
    hasher: _PartHasher,
    cfg: DownloadConfig,
    bar: tqdm,
    stop: threading.Event | None = None,
) -> None:
    """One HTTP request that appends to ``part`` until the file is complete; raises otherwise."""
    have = hasher.size
    headers = {"Accept-Encoding": "identity"}  # byte counts must be the file's bytes
    if have:
        headers["Range"] = f"bytes={have}-"
    with session.get(url, headers=headers, stream=True, timeout=cfg.timeout) as r:
        if r.status_code == 416 and have:
            m = _CONTENT_RANGE_UNSATISFIED.match(r.headers.get("Content-Range", ""))
            if m and int(m.group(1)) == have:
                return  # the .part already holds the whole file
            hasher.restart()
            raise _Retry(f"server refused to resume at byte {have}; restarting from zero")
        if 400 <= r.status_code < 500 and r.status_code not in _RETRYABLE_4XX:
            hint = (
                " (SA-1B links expire: get a fresh links file)"
                if r.status_code in (401, 403, 410)
                else ""
            )
            raise _Fatal(f"HTTP {r.status_code} {r.reason}{hint}")
        if r.status_code >= 400:
            raise _Retry(f"HTTP {r.status_code} {r.reason}")
        length = r.headers.get("Content-Length")
        if r.status_code == 206 and have:
            m = _CONTENT_RANGE.match(r.headers.get("Content-Range", ""))
            if not m:
                hasher.restart()
                raise _Retry(f"bad Content-Range {r.headers.get('Content-Range')!r}; restarting")
            first, last = int(m.group(1)), int(m.group(2))
            if first != have:
                hasher.restart()
                raise _Retry(f"server resumed at byte {first}, not {have}; restarting")
            expected: int | None = last - first + 1
            if length is not None and int(length) != expected:
                raise _Retry(f"Content-Length {length} disagrees with Content-Range {m.group(0)}")
            total = int(m.group(3)) if m.group(3) != "*" else None
        elif r.status_code in (200, 206):
            if have:
                log.warning(
                    "%s: server ignored the Range request (HTTP %d); restarting",
                    url[:60],
                    r.status_code,
                )
                hasher.restart()
            expected = int(length) if length is not None else None
            total = expected
        else:
            raise _Retry(f"unexpected HTTP {r.status_code}")
        bar.reset(total=total)
        bar.update(hasher.size)
        written = 0
        with open(part, "ab") as f:
            # read1 hands over whatever has arrived, so a cut connection loses no received bytes
            # (iter_content would drop a partly filled chunk).
            while chunk := r.raw.read1(cfg.chunk_size, decode_content=False):
                if stop is not None and stop.is_set():
                    raise _Stopped()
                f.write(chunk)
                hasher.update(chunk)
                written += len(chunk)
                bar.update(len(chunk))
        if expected is not None and written != expected:
            raise _Retry(f"connection closed after {written} of {expected} bytes")


class _PartHasher:
    """The md5 of the ``.part`` file, kept up to date as bytes are appended."""

    def __init__(self, part: str):
        self.part = part
        self.md5 = hashlib.md5()
        self.size = 0
        if os.path.exists(part):  # resume across runs: hash what an earlier run left
            with open(part, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    self.update(block)

    def update(self, chunk: bytes) -> None:
        self.md5.update(chunk)
        self.size += len(chunk)

    def restart(self) -> None:
        with open(self.part, "wb"):
            pass
        self.md5 = hashlib.md5()
        self.size = 0

    def hexdigest(self) -> str:
        return self.md5.hexdigest()


def md5_file(path: str) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_tar(path: str) -> int:
    """Read a tar to its end-of-archive marker; return its member count or raise ValueError.

    Reading every member's data catches a file cut inside a member; the end-of-archive check
    catches one cut exactly between two members (which tarfile alone treats as a normal end).
    """
    try:
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            n = 0
            for member in tar:
                n += 1
                if member.isfile():
                    data = tar.extractfile(member)
                    while data.read(1 << 20):  # type: ignore[union-attr]
                        pass
            f.seek(tar.offset)
            tail = f.read(1024)
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"not a complete tar: {e}") from None
    if n == 0:
        raise ValueError("not a complete tar: no members")
    if len(tail) < 1024 or tail.count(0) != len(tail):
        raise ValueError("not a complete tar: no end-of-archive marker (truncated?)")
    return n


def _verify(path: str, md5: str, expected_md5: str | None) -> str:
    """Return how ``path`` was verified, or raise _Fatal."""
    if expected_md5:
        if md5 != expected_md5:
            raise _Fatal(f"md5 mismatch: expected {expected_md5}, got {md5}")
        return "md5 ok"
    try:
        n = verify_tar(path)
    except ValueError as e:
        raise _Fatal(str(e)) from None
    return f"tar read to the end ({n} members; no md5 listed)"


def _check_existing(final: str, marker: str, expected_md5: str | None) -> str:
    st = os.stat(final)
    try:
        with open(marker, encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError):
        rec = None
    if rec and rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns:
        if not expected_md5 or rec.get("md5") == expected_md5:
            return f"already verified ({rec.get('verified_by')})"
        if rec.get("md5"):
            raise _Fatal(f"md5 mismatch: expected {expected_md5}, got {rec['md5']}")
    md5 = md5_file(final)
    how = _verify(final, md5, expected_md5)
    _write_marker(final, marker, md5, how)
    return how


def _write_marker(final: str, marker: str, md5: str, how: str) -> None:
    st = os.stat(final)
    rec = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": md5, "verified_by": how}
    tmp = marker + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rec, f)
    os.replace(tmp, marker)


def _remove(*paths: str) -> None:
    for p in paths:
        if os.path.exists(p):
            os.remove(p)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    msg = text[-1] if text else ""
    return msg[:200] if isinstance(e, _Retry) else f"{type(e).__name__}: {msg[:200]}"
