"""Ingest source: a URL list (csv, tsv, parquet, jsonl or txt) downloaded with the real img2dataset.

img2dataset writes WebDataset shards plus one Parquet file per shard that lists *every* URL with
its ``status`` and ``error_message``; we read both, so each URL becomes an ok row or an error row
that says why it failed. Downloads go to ``STORE/_downloads/<hash of the list and settings>/``:
an interrupted download resumes (img2dataset skips finished shards) and the files stay there to
inspect. img2dataset is told not to re-encode (``disable_all_reencoding``), so the original
bytes reach our own decode: one set of rules (EXIF, alpha, bombs, --max-side) for every source.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from urllib.parse import unquote, urlsplit

from pipeline import fs
from pipeline.errors import UserError
from pipeline.ingest.folder import SourceError
from pipeline.ingest.writer import RawSample, make_key
from pipeline.store import Store, check_member_name

# List file suffix → img2dataset input_format.
FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".jsonl": "jsonl", ".txt": "txt"}
DOWNLOADS = "_downloads"
DONE = "_alphaset_done.json"
OOM_SHARD_COUNT = 5  # img2dataset's default: shard files are named 00000.tar, 00001.tar, …

EPILOG = """\
Reads: a URL list (.csv, .tsv, .parquet, .jsonl with a URL column and an optional caption column,
or .txt with one URL per line); downloads with img2dataset into STORE/_downloads/<hash>/
(resumable; kept for inspection). Writes: STORE/images/, STORE/meta/ (a failed URL is an error row
with img2dataset's status and error message), STORE/manifest.json.
Example: alphaset ingest urls laion_part.parquet --store ./store --url-col URL --caption-col TEXT"""


@dataclass
class DownloadConfig:
    """img2dataset settings; they are part of the download folder's name."""

    processes: int = 1
    threads: int = 16
    timeout: int = 10
    retries: int = 0
    shard_size: int = 10000

    def __post_init__(self) -> None:
        for name in ("processes", "threads", "timeout", "shard_size"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--download-{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.retries < 0:
            raise UserError(f"--retries must be >= 0, got {self.retries}")


@dataclass
class UrlList:
    """A checked URL list: where it is, its img2dataset format and the columns to use."""

    path: str
    input_format: str
    url_col: str
    caption_col: str | None
    sha256: str
    rows: int


def read_url_list(path: str, url_col: str = "url", caption_col: str | None = None) -> UrlList:
    """Check the list now (file, format, columns) so a mistake is one line, not a failed download.

    ``caption_col`` None means "caption" if the list has such a column; a named column must exist.
    """
    if not fs.exists(path):
        raise SourceError(f"no such URL list: {path}")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise SourceError(
            f"{path}: unknown URL list format {suffix!r} (allowed: {', '.join(FORMATS)})"
        )
    if fs.is_local(path):
        path = os.path.abspath(fs.local_path(path))
    data = fs.read_bytes(path)
    fmt = FORMATS[suffix]
    if fmt == "txt":
        if caption_col:
            raise SourceError(
                f"{path}: a .txt list has URLs only; --caption-col needs csv/tsv/parquet/jsonl"
            )
        rows = sum(1 for line in data.splitlines() if line.strip())
        return UrlList(path, fmt, "url", None, hashlib.sha256(data).hexdigest(), rows)
    columns, rows = _columns(data, fmt, path)
    if url_col not in columns:
        raise SourceError(
            f"{path}: no URL column {url_col!r} (columns: {', '.join(columns)}); use --url-col"
        )
    if caption_col is None:
        caption_col = "caption" if "caption" in columns else None
    elif caption_col not in columns:
        raise SourceError(
            f"{path}: no caption column {caption_col!r} (columns: {', '.join(columns)})"
        )
    return UrlList(path, fmt, url_col, caption_col, hashlib.sha256(data).hexdigest(), rows)


def _columns(data: bytes, fmt: str, path: str) -> tuple[list[str], int]:
    import io

    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.json as pjson
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            md = pq.ParquetFile(io.BytesIO(data))
            return md.schema_arrow.names, md.metadata.num_rows
        if fmt == "jsonl":
            t = pjson.read_json(io.BytesIO(data))
        else:
            delim = "\t" if fmt == "tsv" else ","
            t = pcsv.read_csv(io.BytesIO(data), parse_options=pcsv.ParseOptions(delimiter=delim))
    except (pa.ArrowInvalid, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SourceError(f"{path}: not a readable {fmt} file: {first}") from None
    return t.column_names, t.num_rows


def download_dir(store: Store, urls: UrlList, cfg: DownloadConfig) -> str:
    """``STORE/_downloads/<hash>``: the same list with the same settings resumes the same folder."""
    ident = json.dumps(
        {
            "sha256": urls.sha256,
            "url_col": urls.url_col,
            "caption_col": urls.caption_col,
            "shard_size": cfg.shard_size,
            "format": urls.input_format,
        },
        sort_keys=True,
    )
    return store.url(DOWNLOADS, hashlib.sha256(ident.encode()).hexdigest()[:16])


def download(urls: UrlList, out: str, cfg: DownloadConfig) -> None:
    """Run img2dataset into ``out`` (WebDataset + per-shard Parquet), unless already complete.

    Original bytes are kept (no resize, no re-encode): our decode applies the store's rules.
    """
    done_url = fs.join(out, DONE)
    if fs.exists(done_url):
        return
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check on import
    os.environ.setdefault("WANDB_MODE", "disabled")
    import img2dataset

    fs.makedirs(out)
    old_sigint = signal.getsignal(signal.SIGINT)  # img2dataset installs its own SIGINT handler
    try:
        # img2dataset's progress goes to stderr, so stdout keeps only our summary.
        with contextlib.redirect_stdout(sys.stderr):
            img2dataset.download(
                url_list=urls.path,
                output_folder=out,
                input_format=urls.input_format,
                url_col=urls.url_col,
                caption_col=urls.caption_col,
                output_format="webdataset",
                resize_mode="no",
                disable_all_reencoding=True,
                extract_exif=False,
                compute_hash="sha256",
                processes_count=cfg.processes,
                thread_count=cfg.threads,
                timeout=cfg.timeout,
                retries=cfg.retries,
                number_sample_per_shard=cfg.shard_size,
                oom_shard_count=OOM_SHARD_COUNT,
                enable_wandb=False,
                incremental_mode="incremental",
                distributor="multiprocessing",
            )
    finally:
        if old_sigint is not None:
            signal.signal(signal.SIGINT, old_sigint)
    expected = -(-urls.rows // cfg.shard_size)
    finished = [s for s in range(expected) if fs.exists(fs.join(out, f"{_shard(s)}_stats.json"))]
    if len(finished) == expected:
        fs.atomic_write(done_url, json.dumps({**asdict(urls), **asdict(cfg)}, indent=1))
    else:
        print(
            f"warning: img2dataset finished {len(finished)} of {expected} download shard(s); "
            "re-run the same command to retry the others",
            file=sys.stderr,
        )


def _shard(index: int) -> str:
    return f"{index:0{OOM_SHARD_COUNT}d}"


def downloaded_samples(out: str, kind: str = "urls") -> Iterator[RawSample]:
    """One sample per URL img2dataset recorded in ``out``, in URL-list order (shard by shard)."""
    rel_base = DOWNLOADS + "/" + out.rstrip("/").rsplit("/", 1)[-1]
    for name in fs.ls(out, ".parquet"):
        shard = name[: -len(".parquet")]
        if not fs.exists(fs.join(out, f"{shard}_stats.json")):
            continue  # img2dataset did not finish this shard; a re-run retries it
        rows = fs.read_parquet(fs.join(out, name)).to_pylist()
        rows.sort(key=lambda r: r["key"])  # img2dataset keys are list positions
        with _TarIndex(fs.join(out, f"{shard}.tar")) as tar:
            for r in rows:
                yield _sample(r, tar, kind, f"{rel_base}/{shard}.tar")


def _sample(r: dict, tar: _TarIndex, kind: str, tar_path: str) -> RawSample:
    url = r["url"]
    caption = r.get("caption")
    key = make_key(_url_name(url), f"{kind}:{url}")
    info = {
        "img2dataset_key": r["key"],
        "img2dataset_status": r["status"],
        **({"img2dataset_error": r["error_message"]} if r.get("error_message") else {}),
    }
    alt_text = str(caption).strip() or None if caption is not None else None
    common = {"key": key, "url": url, "alt_text": alt_text}
    if r["status"] != "success":
        reason = f"{r['status']}: {r.get('error_message') or 'no error message'}"
        return RawSample(path=None, error=reason, source_meta=info, **common)  # type: ignore[arg-type]
    member, data = tar.image(r["key"])
    if data is None:
        return RawSample(
            path=None,
            error="download missing: img2dataset listed it but its tar has no image",  # type: ignore[arg-type]
            source_meta=info,
            **common,
        )
    return RawSample(path=f"{tar_path}/{member}", data=data, source_meta=info, **common)


def _url_name(url: str) -> str:
    base = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    return os.path.splitext(base)[0] or "url"


class _TarIndex:
    """Random access to the image members of one img2dataset tar (which is ours; still checked)."""

    def __init__(self, url: str):
        self.url = url
        self.members: dict[str, tarfile.TarInfo] = {}

    def __enter__(self) -> _TarIndex:
        self._f = fs.open_read(self.url) if fs.exists(self.url) else None
        self._tar = tarfile.open(fileobj=self._f, mode="r:") if self._f else None
        for m in self._tar.getmembers() if self._tar else []:
            check_member_name(m.name)
            stem, _, ext = m.name.partition(".")
            if m.isfile() and ext in ("jpg", "jpeg", "png", "webp"):
                self.members[stem] = m
        return self

    def image(self, key: str) -> tuple[str | None, bytes | None]:
        m = self.members.get(key)
        if m is None or self._tar is None:
            return None, None
        return m.name, self._tar.extractfile(m).read()  # type: ignore[union-attr]

    def __exit__(self, *exc) -> None:
        if self._tar:
            self._tar.close()
        if self._f:
            self._f.close()


def url_samples(
    list_path: str,
    store: Store,
    url_col: str = "url",
    caption_col: str | None = None,
    cfg: DownloadConfig | None = None,
    retry_errors: bool = False,
) -> Iterator[RawSample]:
    """Check the list, download it with img2dataset into the store's download folder (now),
    and return the samples (lazily). ``retry_errors``: download again the img2dataset shards
    that hold failed URLs (img2dataset's incremental mode redoes just those)."""
    cfg = cfg or DownloadConfig()
    urls = read_url_list(list_path, url_col, caption_col)
    out = download_dir(store, urls, cfg)
    if retry_errors:
        forget_failed_downloads(out)
    download(urls, out, cfg)
    return downloaded_samples(out)


def forget_failed_downloads(out: str) -> list[str]:
    """Delete the download shards of ``out`` that hold a failed URL (and the folder's DONE
    marker), so the next `download` fetches them again; returns the shard names."""
    forgotten = []
    for name in fs.ls(out, ".parquet"):
        shard = name[: -len(".parquet")]
        status = fs.read_parquet(fs.join(out, name), ["status"])["status"].to_pylist()
        if any(st != "success" for st in status):
            for suffix in ("_stats.json", ".parquet", ".tar"):  # stats first: "not finished"
                fs.remove(fs.join(out, shard + suffix))
            forgotten.append(shard)
    if forgotten:
        fs.remove(fs.join(out, DONE))
    return forgotten


def _run(args: argparse.Namespace, run_ingest: Callable) -> int:
    cfg = DownloadConfig(
        processes=args.download_processes,
        threads=args.download_threads,
        timeout=args.timeout,
        retries=args.retries,
    )
    store = Store(args.store)
    samples = url_samples(
        args.src, store, args.url_col, args.caption_col, cfg, retry_errors=args.retry_errors
    )
    settings = {
        "src": args.src,
        "url_col": args.url_col,
        "caption_col": args.caption_col,
        **asdict(cfg),
    }
    return run_ingest(args, "urls", samples, settings)


def register_source(
    src: argparse._SubParsersAction, add_common: Callable, run_ingest: Callable
) -> None:
    p = src.add_parser(
        "urls",
        help="a URL list (csv, tsv, parquet, jsonl, txt) downloaded with img2dataset",
        description="Download a URL list with img2dataset and ingest the result; failed URLs become error rows.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src", help="the URL list: .csv, .tsv, .parquet, .jsonl (or .txt, one URL per line)"
    )
    p.add_argument("--url-col", default="url", help="column holding the URL (default: url)")
    p.add_argument(
        "--caption-col",
        default=None,
        help="column holding the caption, kept as alt_text (default: 'caption' when the list has one)",
    )
    p.add_argument(
        "--download-processes", type=int, default=1, help="img2dataset processes (default 1)"
    )
    p.add_argument(
        "--download-threads", type=int, default=16, help="download threads per process (default 16)"
    )
    p.add_argument("--timeout", type=int, default=10, help="seconds per request (default 10)")
    p.add_argument("--retries", type=int, default=0, help="retries per failed URL (default 0)")
    add_common(p)
    p.set_defaults(func=lambda args: _run(args, run_ingest))
