"""Importing existing dense captions of SA-1B images (e.g. PixArt's SAM-LLaVA-Captions10M) into
``captions/<tag>/`` as a regular, shard-aligned caption stage.

Sources, keyed by SA id: a folder of ``sa_<id>.txt`` files (the released layout), a ``.tar`` /
``.tar.gz`` of them (read as a stream, never extracted), or a parquet / jsonl / csv / tsv table
with an id column and a caption column. Output shard N holds the ok keys of image shard N in
order; an image without a caption is an error row ``no caption``. Ids that match no ok image are
counted and reported, not written. Only the captions of the shards still to do are held in memory
(a folder source holds file paths and reads each caption when its shard is written).
"""

from __future__ import annotations

import os
import re
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline import fs
from pipeline.errors import UserError
from pipeline.stage import StageSpec, StageSummary, pending_shards, run_stage
from pipeline.store import Store, check_member_name
from sam_data.ingest import sa_key

DEFAULT_TAG = "sam-llava"
DEFAULT_MODEL = "imported"
N_EXAMPLES = 5

CAPTION_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("caption", pa.string()),
        ("model", pa.string()),
        ("prompt", pa.string()),
        ("n_tokens", pa.int32()),
        ("truncated", pa.bool_()),
        ("error", pa.string()),
    ]
)

# Column names tried, in order, when the table's columns are not given.
ID_COLUMNS = ("key", "id", "sa_id", "image_id", "file_name", "filename", "image", "name", "path")
CAPTION_COLUMNS = ("caption", "text", "prompt", "dense_caption", "llava_caption", "description")
TABLE_SUFFIXES = (".parquet", ".jsonl", ".ndjson", ".csv", ".tsv")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# Same rule as `sam_data.ingest.sa_key`, vectorised: optional folders, optional sa_, digits, ext.
_ID_PATTERN = r"(?:^|/)(?:sa_)?(\d+)(?:\.[^/]*)?$"
_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class CaptionIndex:
    """The captions a source holds for the images to write, and what it holds beyond them."""

    captions: dict[str, str] = field(default_factory=dict)  # key -> caption (or .txt path if lazy)
    lazy: bool = False
    entries: int = 0  # ids read from the source
    orphans: int = 0  # ids with no ok image in the store
    orphan_examples: list[str] = field(default_factory=list)
    bad_ids: int = 0  # entries whose id is not an SA-1B id
    bad_examples: list[str] = field(default_factory=list)
    duplicates: int = 0  # repeated ids of store images (the first one wins)

    def get(self, key: str) -> str | None:
        """The caption of ``key`` or None; OSError if its file cannot be read."""
        value = self.captions.get(key)
        if value is None or not self.lazy:
            return value
        with open(value, encoding="utf-8", errors="replace") as f:
            return f.read()

    def _orphan(self, raw: str) -> None:
        self.orphans += 1
        if len(self.orphan_examples) < N_EXAMPLES:
            self.orphan_examples.append(raw)

    def _bad(self, raw: str) -> None:
        self.bad_ids += 1
        if len(self.bad_examples) < N_EXAMPLES:
            self.bad_examples.append(raw)


def check_tag(tag: str) -> None:
    if not _TAG.match(tag):
        raise UserError(
            f"--tag {tag!r} must be letters, digits, '.', '_' or '-' (and not start with '_' or '.')"
        )


def check_caption_source(path: str) -> str:
    """Return the kind of caption source at ``path`` (folder | tar | table) or raise."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such captions file or folder: {path}")
    if os.path.isdir(path):
        return "folder"
    lower = path.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "tar"
    if lower.endswith(TABLE_SUFFIXES):
        return "table"
    raise UserError(
        f"captions {path}: expected a folder of sa_<id>.txt, a .tar/.tar.gz of them, "
        f"or a {'/'.join(s.lstrip('.') for s in TABLE_SUFFIXES)} table"
    )


def load_index(
    path: str,
    wanted: set[str],
    known: set[str],
    id_column: str | None = None,
    caption_column: str | None = None,
) -> CaptionIndex:
    """Read the captions of the ``wanted`` keys from ``path``; ids outside ``known`` are orphans."""
    kind = check_caption_source(path)
    if kind == "table":
        return _load_table(path, wanted, known, id_column, caption_column)
    if id_column or caption_column:
        raise UserError(f"--id-column/--caption-column apply to tables, not to the {kind} {path}")
    index = CaptionIndex(lazy=kind == "folder")
    seen: set[str] = set()

    def add(raw: str, value_of) -> None:
        index.entries += 1
        key = sa_key(raw)
        if key is None:
            index._bad(raw)
        elif key not in known:
            index._orphan(raw)  # not remembered: memory stays bounded by the store, not the source
        elif key in seen:
            index.duplicates += 1
        else:
            seen.add(key)
            if key in wanted:
                index.captions[key] = value_of()

    if kind == "folder":
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames.sort()
            rel = os.path.relpath(dirpath, path).replace(os.sep, "/")
            prefix = "" if rel == "." else rel + "/"
            for name in sorted(filenames):
                if name.endswith(".txt") and not name.startswith("."):
                    add(prefix + name, lambda full=os.path.join(dirpath, name): full)
        return index
    with tarfile.open(path, "r|*") as tar:  # a stream: a 10M-file .tar.gz is read once, in order
        for member in tar:
            if not (member.isfile() and member.name.endswith(".txt")):
                continue
            try:
                check_member_name(member.name)
            except ValueError:
                index._bad(member.name)
                continue

            def read(member=member) -> str:
                return tar.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]

            add(member.name, read)
    return index


def _load_table(
    path: str, wanted: set[str], known: set[str], id_column: str | None, caption_column: str | None
) -> CaptionIndex:
    import polars as pl

    lower = path.lower()
    if lower.endswith(".parquet"):
        lf = pl.scan_parquet(path)
    elif lower.endswith((".jsonl", ".ndjson")):
        lf = pl.scan_ndjson(path)
    else:
        lf = pl.scan_csv(path, separator="\t" if lower.endswith(".tsv") else ",")
    try:
        names = lf.collect_schema().names()
    except Exception as e:  # polars raises several types for unreadable files
        raise UserError(
            f"captions {path}: cannot read the table: {str(e).splitlines()[0]}"
        ) from None
    idc = _pick(names, id_column, ID_COLUMNS, "--id-column", path)
    capc = _pick(names, caption_column, CAPTION_COLUMNS, "--caption-column", path)
    raw = pl.col(idc).cast(pl.String)
    key = pl.lit("sa_") + raw.str.replace_all("\\", "/", literal=True).str.extract(
        _ID_PATTERN, 1
    ).cast(pl.Int64, strict=False).cast(pl.String)
    df = lf.select(
        raw.alias("raw"), key.alias("key"), pl.col(capc).cast(pl.String).alias("caption")
    ).collect()
    index = CaptionIndex(entries=df.height)
    bad = df.filter(pl.col("key").is_null())
    index.bad_ids = bad.height
    index.bad_examples = [str(v) for v in bad["raw"].head(N_EXAMPLES).to_list()]
    df = df.filter(pl.col("key").is_not_null())
    unique = df.unique(subset="key", keep="first", maintain_order=True)
    index.duplicates = df.height - unique.height
    known_s = pl.Series(list(known), dtype=pl.String)
    orphans = unique.filter(~pl.col("key").is_in(known_s))
    index.orphans = orphans.height
    index.orphan_examples = orphans["raw"].head(N_EXAMPLES).to_list()
    keep = unique.filter(pl.col("key").is_in(pl.Series(list(wanted), dtype=pl.String)))
    index.captions = {
        k: c
        for k, c in zip(keep["key"].to_list(), keep["caption"].to_list(), strict=True)
        if c is not None
    }
    return index


def _pick(
    names: list[str], given: str | None, candidates: tuple[str, ...], flag: str, path: str
) -> str:
    if given:
        if given not in names:
            raise UserError(f"captions {path}: no column {given!r} (columns: {', '.join(names)})")
        return given
    for c in candidates:
        if c in names:
            return c
    raise UserError(
        f"captions {path}: none of the columns {', '.join(names)} looks like {flag[2:].replace('-', ' ')}; "
        f"name it with 'alphaset sam captions … {flag} NAME'"
    )


class CaptionImporter:
    """Stage worker: writes ``captions/<tag>/<shard>.parquet`` from a loaded `CaptionIndex`."""

    def __init__(self, store: str, stage: str, index: CaptionIndex, model: str, settings: dict):
        self.store = Store(store)
        self.stage = stage
        self.index = index
        self.model = model
        self.settings = settings

    def __call__(self, shard: str) -> dict:
        t0 = time.perf_counter()
        keys = self.store.ok_keys(shard)
        captions: list[str | None] = []
        errors: list[str | None] = []
        for key in keys:
            try:
                text = self.index.get(key)
            except OSError as e:
                captions.append(None)
                errors.append(f"unreadable caption file: {e.strerror or e}")
                continue
            text = text.strip() if text is not None else None
            captions.append(text or None)
            errors.append(None if text else ("no caption" if text is None else "empty caption"))
        n = len(keys)
        table = pa.table(
            {
                "key": keys,
                "caption": captions,
                "model": [self.model] * n,
                "prompt": [None] * n,
                "n_tokens": [None] * n,
                "truncated": [False if e is None else None for e in errors],
                "error": errors,
            },
            schema=CAPTION_SCHEMA,
        )
        name = f"{shard}.parquet"
        checksum = fs.write_parquet(fs.join(self.store.stage_dir(self.stage), name), table)
        by_reason = Counter(e.split(":", 1)[0] for e in errors if e)
        return self.store.write_status(
            self.stage,
            shard,
            {
                "rows": n,
                "ok": n - sum(by_reason.values()),
                "errors": sum(by_reason.values()),
                "errors_by_reason": dict(by_reason),
                "checksum": checksum,
                "output": name,
                "model": self.model,
                "settings": self.settings,
                "seconds": round(time.perf_counter() - t0, 3),
            },
        )


@dataclass
class CaptionImport:
    """What an import did: the stage summary plus what did not match."""

    stage: StageSummary
    index: CaptionIndex
    missing: int = 0  # ok images of the written shards without a caption
    missing_examples: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = self.stage.lines()
        if not self.stage.done and not self.stage.failed:
            out.append("  nothing to do: every shard already has these captions")
            return out
        ix = self.index
        matched = len(ix.captions)
        out.append(f"  source: {ix.entries} captions read, {matched} matched an image to write")
        if self.missing:
            out.append(
                f"  {self.missing} images without a caption (error rows 'no caption'), "
                f"e.g. {', '.join(self.missing_examples)}"
            )
        if ix.orphans:
            out.append(
                f"  {ix.orphans} caption ids without an image in the store, "
                f"e.g. {', '.join(ix.orphan_examples)}"
            )
        if ix.bad_ids:
            out.append(
                f"  {ix.bad_ids} entries whose id is not an SA-1B id, e.g. {', '.join(ix.bad_examples)}"
            )
        if ix.duplicates:
            out.append(f"  {ix.duplicates} repeated ids (the first caption was kept)")
        return out


def import_captions(
    store: Store | str,
    path: str,
    tag: str = DEFAULT_TAG,
    model: str = DEFAULT_MODEL,
    id_column: str | None = None,
    caption_column: str | None = None,
    progress: bool = True,
) -> CaptionImport:
    """Import captions keyed by SA id from ``path`` into ``captions/<tag>/`` of ``store``.

    Shards that already have this tag are skipped, so it runs again after a later ingest.
    """
    store = store if isinstance(store, Store) else Store(store)
    check_tag(tag)
    check_caption_source(path)
    store.require()
    stage = f"captions/{tag}"
    spec = StageSpec(
        stage=stage,
        worker_cls=CaptionImporter,
        worker_kwargs={},
        settings={"source": "imported", "model": model},
    )
    todo, _ = pending_shards(store, spec)
    keys_of = {s: store.ok_keys(s) for s in store.shards()}
    known = {k for keys in keys_of.values() for k in keys}
    wanted = {k for s in todo for k in keys_of[s]}
    index = load_index(path, wanted, known, id_column, caption_column) if todo else CaptionIndex()
    spec.worker_kwargs = {
        "store": store.root,
        "stage": stage,
        "index": index,
        "model": model,
        "settings": {
            "path": os.path.abspath(path),
            "id_column": id_column,
            "caption_column": caption_column,
        },
    }
    summary = run_stage(store, spec, progress=progress, use_ray=False)
    missing = [k for s in todo for k in keys_of[s] if k not in index.captions]
    return CaptionImport(
        stage=summary, index=index, missing=len(missing), missing_examples=missing[:N_EXAMPLES]
    )
