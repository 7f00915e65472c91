"""What is in a store and whether it is intact: ``show``, ``stats`` and ``verify``.

Everything here reads the status records (the truth the manifest is rebuilt from, see
`Store.refresh_manifest`), through each stage's status index (a listing plus the records changed
since the index was written: a few requests per stage on S3, not one per shard), and the files
themselves; nothing writes to the store, not even the index, so these work on a read-only copy. Each function returns a JSON-ready dict; ``*_lines`` render it for a terminal.

``verify`` re-reads every shard and table and lists every problem it finds rather than stopping
at the first: missing or unreadable files, checksums, row counts against status records, keys of
every stage shard against the image shard's ok keys (same keys, same order; a view's keys for a
stage made from a view), each key once in the store, unsafe tar member names, optionally
undecodable images, and stage shards of shards never ingested. An unreadable manifest or status
record is a problem row naming the file, never an abort. Files without a status record (what a
crash between a write and its record leaves) are warnings: the next run of that stage, or
``manifest repair`` (`pipeline.repair`), sets them aside.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import polars as pl
import pyarrow.parquet as pq

from pipeline import fs, images
from pipeline.ingest.writer import error_category
from pipeline.store import INDEX_NAME, STATUS_DIR, Store, StoreError, iter_tar_stream

PERCENTILES = {
    "min": 0.0,
    "p5": 0.05,
    "p25": 0.25,
    "p50": 0.5,
    "p75": 0.75,
    "p95": 0.95,
    "max": 1.0,
}
IMAGE_EXTS = ("jpg", "png", "webp")


# ---- show -------------------------------------------------------------------------------------
def ranges(shards: list[str]) -> str:
    """``["000001", "000002", "000003", "000007"]`` → ``"000001-000003, 000007"``."""
    out: list[str] = []
    nums = sorted(int(s) for s in shards)
    i = 0
    while i < len(nums):
        j = i
        while j + 1 < len(nums) and nums[j + 1] == nums[j] + 1:
            j += 1
        out.append(f"{nums[i]:06d}" if i == j else f"{nums[i]:06d}-{nums[j]:06d}")
        i = j + 1
    return ", ".join(out)


def show(store: Store) -> dict[str, Any]:
    """Shards, rows, and which stages are done on which shards."""
    manifest = store.read_manifest()
    records = store.completed_all()
    ingest = records.pop("ingest")
    shards = sorted(ingest)
    stages = {}
    for stage, done in records.items():
        stages[stage] = {
            "done": len([s for s in done if s in ingest]),
            "of": len(shards),
            "missing": ranges([s for s in shards if s not in done]),
            "not_ingested": sorted(s for s in done if s not in ingest),
            "rows": sum(int(r.get("rows", 0)) for r in done.values()),
            "errors": sum(int(r.get("errors", 0)) for r in done.values()),
        }
    return {
        "store": store.root,
        "schema_version": manifest.get("schema_version"),
        "created": manifest.get("created"),
        "shards": len(shards),
        "shard_range": ranges(shards),
        "rows": sum(int(r.get("rows", 0)) for r in ingest.values()),
        "ok": sum(int(r.get("ok", 0)) for r in ingest.values()),
        "errors": sum(int(r.get("errors", 0)) for r in ingest.values()),
        "sources": dict(Counter(r.get("source") or "?" for r in ingest.values())),
        "stages": stages,
        "views": _view_names(store),
    }


def _view_names(store: Store) -> list[str]:
    from pipeline.views import view_names

    return view_names(store)


def show_lines(info: dict[str, Any]) -> list[str]:
    out = [
        f"store {info['store']} (schema {info['schema_version']}, created {info['created']})",
        f"  ingest: {info['shards']} shard(s) [{info['shard_range'] or 'none'}], {info['rows']} rows "
        f"({info['ok']} ok, {info['errors']} errors); shards by source: "
        + (", ".join(f"{k} {v}" for k, v in sorted(info["sources"].items())) or "none"),
    ]
    width = max([len(s) for s in info["stages"]] + [8])
    for stage, s in info["stages"].items():
        line = f"  {stage:<{width}}  {s['done']}/{s['of']} shards, {s['rows']} rows, {s['errors']} errors"
        if s["missing"]:
            line += f"; missing {s['missing']}"
        if s["not_ingested"]:
            line += f"; shards never ingested: {', '.join(s['not_ingested'])}"
        out.append(line)
    if not info["stages"]:
        out.append("  no stage outputs yet")
    out.append(f"  views: {', '.join(info['views']) or 'none'}")
    return out


# ---- stats ------------------------------------------------------------------------------------
def percentiles(series: pl.Series) -> dict[str, float] | None:
    """min/p5/p25/p50/p75/p95/max and mean of the non-null, finite values (None when empty)."""
    s = series.cast(pl.Float64).drop_nulls()
    s = s.filter(s.is_finite())
    if s.is_empty():
        return None
    out = {name: float(s.quantile(q, "linear")) for name, q in PERCENTILES.items()}  # type: ignore[arg-type]
    out["mean"] = float(s.mean())  # type: ignore[arg-type]
    out["count"] = s.len()
    return out


def _read_stage_frame(store: Store, stage: str) -> pl.DataFrame | None:
    from pipeline.views import read_stage

    return read_stage(store, stage)


def stats(store: Store) -> dict[str, Any]:
    """Counts, size/bytes percentiles, errors by reason, per-stage coverage, score percentiles."""
    store.require()
    shards = store.shards()
    ingest = store.completed("ingest")
    frames = [pl.from_arrow(store.read_meta(s)) for s in shards]
    meta = pl.concat(frames, how="diagonal_relaxed") if frames else None
    out: dict[str, Any] = {"store": store.root, "shards": len(shards)}
    if meta is None:
        out.update(rows=0, ok=0, errors=0, errors_by_reason={}, sizes={}, stages={})
        return out
    ok = meta.filter(pl.col("status") == "ok")
    bad = meta.filter(pl.col("status") != "ok")["error"].fill_null("unknown").to_list()
    reasons = Counter(error_category(e) for e in bad)
    out.update(
        rows=meta.height,
        ok=ok.height,
        errors=meta.height - ok.height,
        errors_by_reason=dict(reasons.most_common()),
        bytes_total=int(ok["bytes"].sum() or 0),
        sources=dict(Counter(meta["source"].fill_null("?").to_list())),
    )
    sizes = {
        "width": percentiles(ok["width"]),
        "height": percentiles(ok["height"]),
        "aspect": percentiles(ok["width"].cast(pl.Float64) / ok["height"].cast(pl.Float64)),
        "megapixels": percentiles(
            ok["width"].cast(pl.Float64) * ok["height"].cast(pl.Float64) / 1e6
        ),
        "bytes": percentiles(ok["bytes"]),
    }
    out["sizes"] = {k: v for k, v in sizes.items() if v is not None}
    stages: dict[str, Any] = {}
    for stage in store.stages():
        done = {s: r for s, r in store.completed(stage).items() if s in ingest}
        errs: Counter = Counter()
        for r in done.values():
            errs.update(r.get("errors_by_reason") or {})
        entry: dict[str, Any] = {
            "shards_done": len(done),
            "shards": len(shards),
            "rows": sum(int(r.get("rows", 0)) for r in done.values()),
            "coverage": round(
                sum(int(ingest[s].get("ok", 0)) for s in done) / max(ok.height, 1), 4
            ),
            "errors": sum(int(r.get("errors", 0)) for r in done.values()),
            "errors_by_reason": dict(errs.most_common()),
        }
        removed = _removed_by_threshold(done.values())
        if removed:
            entry["removed_by_threshold"] = removed
        kind = stage.split("/", 1)[0]
        if kind in ("scores", "captions"):
            table = _read_stage_frame(store, stage)
            if table is not None:
                entry["columns"] = _column_stats(table, kind, skip=set(out["sizes"]))
        stages[stage] = entry
    out["stages"] = stages
    return out


def _removed_by_threshold(records) -> dict[str, int]:
    """Rows each dedup threshold removes (``{"phash<=8": n, …}``), summed over the shards'
    status records; empty for other stages. `curation.dedup.removed_line` orders them."""
    out: dict[str, int] = {}
    for r in records:
        for label, n in (r.get("removed_by_threshold") or {}).items():
            out[label] = out.get(label, 0) + int(n)
    return out


def _column_stats(table: pl.DataFrame, kind: str, skip: set[str]) -> dict[str, Any]:
    """Percentiles of every numeric score column (but ``skip``: the image sizes already shown
    from meta); caption length in characters and words."""
    if "error" in table.columns:
        table = table.filter(pl.col("error").is_null())
    out = {}
    if kind == "captions" and "caption" in table.columns:
        cap = table["caption"].drop_nulls()
        out["caption_chars"] = percentiles(cap.str.len_chars())
        out["caption_words"] = percentiles(cap.str.count_matches(r"\S+"))
    for name, dtype in table.schema.items():
        if name not in ("key", "error", *skip) and dtype.is_numeric():
            out[name] = percentiles(table[name])
    return {k: v for k, v in out.items() if v is not None}


def _fmt(v: float) -> str:
    if abs(v) >= 1000 or v == int(v):
        return f"{v:.0f}"
    return f"{v:.3g}"


def _pct_line(name: str, p: dict[str, float], indent: str) -> str:
    cells = "  ".join(f"{k} {_fmt(p[k])}" for k in (*PERCENTILES, "mean"))
    return f"{indent}{name:<22} {cells}"


def stats_lines(info: dict[str, Any]) -> list[str]:
    out = [
        f"store {info['store']}: {info['shards']} shard(s), {info['rows']} samples "
        f"({info['ok']} ok, {info['errors']} errors), {info.get('bytes_total', 0) / 1e6:.1f} MB of images",
    ]
    for reason, n in info["errors_by_reason"].items():
        out.append(f"  error  {n:>7}  {reason}")
    if info["sizes"]:
        out.append("  images:")
        for name, p in info["sizes"].items():
            out.append(_pct_line(name, p, "    "))
    for stage, s in info["stages"].items():
        out.append(
            f"  {stage}: {s['shards_done']}/{s['shards']} shards, {s['coverage']:.1%} of ok images, "
            f"{s['rows']} rows, {s['errors']} errors"
        )
        for reason, n in s["errors_by_reason"].items():
            out.append(f"    error  {n:>7}  {reason}")
        if s.get("removed_by_threshold"):
            from curation.dedup import removed_line

            out.append("    removes: " + removed_line(s["removed_by_threshold"], s["rows"]))
        for name, p in s.get("columns", {}).items():
            out.append(_pct_line(name, p, "    "))
    return out


# ---- verify -----------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    problems: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    checked: Counter = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, path: str, message: str) -> None:
        self.problems.append({"path": path, "message": message})

    def warning(self, path: str, message: str) -> None:
        self.warnings.append({"path": path, "message": message})

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["checked"] = dict(self.checked)
        d["ok"] = self.ok
        return d


def verify_lines(info: dict[str, Any]) -> list[str]:
    checked = ", ".join(f"{n} {what}" for what, n in sorted(info["checked"].items()))
    out = [f"verify: checked {checked or 'nothing'}"]
    for p in info["problems"]:
        out.append(f"  PROBLEM {p['path']}: {p['message']}")
    for w in info["warnings"]:
        out.append(f"  warning {w['path']}: {w['message']}")
    n, w = len(info["problems"]), len(info["warnings"])
    out.append(f"verify: {'OK' if not n else 'FAILED'}, {n} problem(s), {w} warning(s)")
    return out


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes what passes through it (one pass for checksum + parse)."""

    def __init__(self, raw: IO[bytes]):
        self.raw = raw
        self.sha = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.raw.read(len(b))
        self.sha.update(data)
        b[: len(data)] = data
        return len(data)

    def drain(self) -> str:
        for block in iter(lambda: self.raw.read(1 << 20), b""):
            self.sha.update(block)
        return self.sha.hexdigest()


def _read_tar(
    store: Store, rel: str, report: VerifyReport, decode: bool, images_expected: bool
) -> tuple[list[str], str] | None:
    """(sample keys in tar order, sha256) of ``rel``, or None when unreadable (reported)."""
    keys: list[str] = []
    try:
        with fs.open_read(store.url(rel)) as raw:
            stream = _HashingReader(raw)
            buffered = io.BufferedReader(stream, 1 << 20)
            for key, files in iter_tar_stream(buffered, lambda msg: report.problem(rel, msg)):
                keys.append(key)
                if not images_expected:
                    continue
                ext = next((e for e in IMAGE_EXTS if e in files), None)
                if ext is None:
                    report.problem(
                        rel, f"sample {key!r} has no image (members: {', '.join(sorted(files))})"
                    )
                elif decode:
                    report.checked["images decoded"] += 1
                    try:
                        images.decode(files[ext])
                    except images.ImageError as e:
                        report.problem(rel, f"image {key}.{ext} does not decode: {e}")
            buffered.read()  # the tar's end-of-archive padding
            checksum = stream.drain()
    except (tarfile.TarError, OSError, EOFError) as e:
        report.problem(rel, f"unreadable tar: {type(e).__name__}: {e}")
        return None
    return keys, checksum


def _read_parquet(store: Store, rel: str, report: VerifyReport):
    """(table, sha256) of ``rel``, or None when unreadable (reported)."""
    try:
        data = fs.read_bytes(store.url(rel))
    except OSError as e:
        report.problem(rel, f"unreadable: {e}")
        return None
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as e:  # pyarrow raises several types on a corrupt file; all are a problem
        report.problem(
            rel,
            f"unreadable Parquet: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
        )
        return None
    return table, hashlib.sha256(data).hexdigest()


def _compare_keys(
    report: VerifyReport, rel: str, keys: list[str], expected: list[str], against: str
) -> None:
    if keys == expected:
        return
    have, want = set(keys), set(expected)
    if have == want and len(keys) == len(expected):
        first = next(i for i, (a, b) in enumerate(zip(keys, expected, strict=True)) if a != b)
        report.problem(
            rel,
            f"keys out of order vs {against} (same {len(keys)} keys; first difference at row {first})",
        )
        return
    missing = [k for k in expected if k not in have]
    extra = [k for k in keys if k not in want]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} not in {against} (e.g. {extra[0]})")
    dups = len(keys) - len(have)
    if dups:
        parts.append(f"{dups} duplicate key(s)")
    report.problem(rel, f"keys differ from {against}: " + "; ".join(parts))


def _check_checksum(
    report: VerifyReport, rel: str, rec: dict[str, Any], field_name: str, actual: str
) -> None:
    expected = rec.get(field_name)
    if not expected:
        report.warning(rel, f"status record has no {field_name}; content not checked")
    elif expected != actual:
        report.problem(
            rel, f"checksum mismatch: status record {expected[:12]}…, file {actual[:12]}…"
        )
    else:
        report.checked["checksums"] += 1


def _check_counts(
    report: VerifyReport, rel: str, rec: dict[str, Any], rows: int, errors: int | None
) -> None:
    if rec.get("rows") is not None and int(rec["rows"]) != rows:
        report.problem(rel, f"{rows} rows but the status record says {rec['rows']}")
    if errors is not None and rec.get("errors") is not None and int(rec["errors"]) != errors:
        report.problem(rel, f"{errors} error rows but the status record says {rec['errors']}")


def verify(store: Store, decode: bool = False) -> dict[str, Any]:
    """Re-read every shard and table of ``store``; return the report (``ok``, problems, warnings).

    Never stops at the first problem: an unreadable manifest or status record is a problem row
    naming the file, like any other. Keys are checked once across the whole store (a key in two
    shards is a problem, also when one of them is a meta file without a status record). A stage
    made from a view (``features --view``) is compared with that view's keys.
    """
    report = VerifyReport()
    store.require()
    manifest: dict[str, Any] = {}
    try:
        manifest = store.read_manifest()
    except StoreError as e:
        report.problem("manifest.json", str(e).split(f"{store.manifest_url} ", 1)[-1])
    ingest = _records(store, "ingest", report)
    ok_keys: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for shard, rec in sorted(ingest.items()):
        ok_keys[shard] = _verify_ingest_shard(store, shard, rec, report, decode, seen)
    if manifest and sorted(manifest.get("shards", {})) != sorted(ingest):
        report.warning(
            "manifest.json",
            "lists other shards than the status records (stale; any stage run or ingest refreshes it)",
        )
    _orphans(store, "images", ".tar", ingest, report)
    _orphans(store, "meta", ".parquet", ingest, report, seen)
    for stage in store.stages():
        done = _records(store, stage, report)
        report.checked["stages"] += 1
        listed = set(manifest.get("stages", {}).get(stage, {}).get("shards", {}))
        if listed - set(done):
            report.warning(
                "manifest.json",
                f"lists {stage} shard(s) {ranges(sorted(listed - set(done)))} as done but their "
                "status records are missing (the next run of that stage redoes them)",
            )
        expected = _stage_expected(store, stage, ok_keys, report)
        for shard, rec in sorted(done.items()):
            _verify_stage_shard(store, stage, shard, rec, expected, report, ok_keys)
        _orphans(store, stage, None, done, report)
    return report.to_dict()


def _records(store: Store, stage: str, report: VerifyReport) -> dict[str, dict[str, Any]]:
    """The readable status records of ``stage``; each unreadable one is a problem."""
    problems: list[tuple[str, str]] = []
    records = store.completed(stage, problems=problems)
    for url, message in problems:
        rel = url[len(store.root) + 1 :] if url.startswith(store.root + "/") else url
        report.problem(rel, message.split(f"{url} ", 1)[-1])
    drift = store.sealed_index_drift(stage, records)
    if drift:
        # Readers of a store with sealed-index reads (object stores) take the index for the
        # records: a shard deleted by hand would be skipped as done. Locally they list: harmless.
        say = report.problem if store.reads == "index" else report.warning
        say(
            f"{STATUS_DIR}/{stage}/{INDEX_NAME}",
            f"sealed, but the status records of shard(s) {ranges(drift)} differ from it (changed "
            f"by hand?); 'alphaset manifest repair --store {store.root}' re-seals it from the records",
        )
    return records


def _stage_expected(
    store: Store, stage: str, ok_keys: dict[str, list[str]], report: VerifyReport
) -> tuple[dict[str, list[str]], str]:
    """The keys each shard of ``stage`` must hold, and what they are: the ok keys of the image
    shard, or — for a stage made from a view (its settings name one) — the view's keys."""
    try:
        cfg = store.stage_config(stage) or {}
    except StoreError as e:
        report.problem(f"{STATUS_DIR}/{stage}/config.json", str(e).split(" is ", 1)[-1])
        cfg = {}
    view = (cfg.get("settings") or {}).get("view")
    if not view:
        return ok_keys, "the ok keys of images/{shard}.tar"
    from pipeline.views import view_keys

    try:
        by_shard = view_keys(store, view)
    except (StoreError, OSError, ValueError) as e:
        report.problem(f"views/{view}.parquet", f"view of {stage} unreadable: {e}")
        return {}, f"view {view}"
    keep = {s: set(keys) for s, keys in by_shard.items()}
    # in image-shard order (a view lists keys in shard order, then ingest order)
    expected = {s: [k for k in keys if k in keep.get(s, ())] for s, keys in ok_keys.items()}
    return expected, f"the keys of view {view} in shard {{shard}}"


def _verify_ingest_shard(
    store: Store,
    shard: str,
    rec: dict[str, Any],
    report: VerifyReport,
    decode: bool,
    seen: dict[str, str],
) -> list[str]:
    report.checked["image shards"] += 1
    meta_rel, tar_rel = f"meta/{shard}.parquet", f"images/{shard}.tar"
    expected: list[str] = []
    if not fs.exists(store.url(meta_rel)):
        report.problem(meta_rel, "missing (its ingest status record exists)")
    elif (got := _read_parquet(store, meta_rel, report)) is not None:
        table, checksum = got
        _check_checksum(report, meta_rel, rec, "meta_checksum", checksum)
        if "key" not in table.column_names or "status" not in table.column_names:
            report.problem(meta_rel, "no key/status columns")
        else:
            keys, status = table["key"].to_pylist(), table["status"].to_pylist()
            expected = [k for k, s in zip(keys, status, strict=True) if s == "ok"]
            _check_counts(report, meta_rel, rec, len(keys), len(keys) - len(expected))
            if rec.get("ok") is not None and int(rec["ok"]) != len(expected):
                report.problem(
                    meta_rel, f"{len(expected)} ok rows but the status record says {rec['ok']}"
                )
            if "shard" in table.column_names and set(table["shard"].to_pylist()) - {shard}:
                report.problem(meta_rel, f"rows name another shard than {shard}")
            for k in keys:
                if k in seen:
                    report.problem(meta_rel, f"key {k!r} also in shard {seen[k]}")
                seen[k] = shard
    if not fs.exists(store.url(tar_rel)):
        report.problem(tar_rel, "missing (its ingest status record exists)")
    elif (got := _read_tar(store, tar_rel, report, decode, images_expected=True)) is not None:
        keys, checksum = got
        _check_checksum(report, tar_rel, rec, "checksum", checksum)
        _compare_keys(report, tar_rel, keys, expected, f"the ok keys of {meta_rel}")
    return expected


def _verify_stage_shard(
    store: Store,
    stage: str,
    shard: str,
    rec: dict[str, Any],
    expected: tuple[dict[str, list[str]], str],
    report: VerifyReport,
    ok_keys: dict[str, list[str]],
) -> None:
    output = rec.get("output") or (
        f"{shard}.tar" if stage.startswith("features/") else f"{shard}.parquet"
    )
    rel = f"{stage}/{output}"
    report.checked["stage shards"] += 1
    if shard not in ok_keys:
        report.problem(rel, f"stage output for shard {shard}, which was never ingested")
        return
    if not fs.exists(store.url(rel)):
        report.problem(rel, "missing (its status record exists)")
        return
    keys_by_shard, what = expected
    against = what.format(shard=shard)
    if output.endswith(".tar"):
        got = _read_tar(store, rel, report, decode=False, images_expected=False)
        if got is None:
            return
        keys, checksum = got
        _check_counts(report, rel, rec, len(keys), None)
    else:
        got = _read_parquet(store, rel, report)
        if got is None:
            return
        table, checksum = got
        if "key" not in table.column_names:
            report.problem(rel, "no key column")
            return
        keys = table["key"].to_pylist()
        errors = table["error"].null_count if "error" in table.column_names else None
        _check_counts(report, rel, rec, len(keys), None if errors is None else len(keys) - errors)
        if errors is None:
            report.problem(rel, "no error column (the stage contract requires one)")
    _check_checksum(report, rel, rec, "checksum", checksum)
    if rec.get("output_bytes") is not None and int(rec["output_bytes"]) != fs.size(store.url(rel)):
        report.problem(
            rel, f"size {fs.size(store.url(rel))} but the status record says {rec['output_bytes']}"
        )
    _compare_keys(report, rel, keys, keys_by_shard.get(shard, []), against)


def _orphans(
    store: Store,
    folder: str,
    suffix: str | None,
    done: dict[str, Any],
    report: VerifyReport,
    seen: dict[str, str] | None = None,
) -> None:
    """Warn about shard files in ``folder`` with no status record (a problem when a meta file's
    keys are also in an ingested shard: readers of the folder see them twice), and about
    leftover temp files."""
    for name in fs.ls(store.url(folder)):
        if name.startswith(("_", ".")):
            continue
        if suffix is not None and not name.endswith(suffix):
            report.warning(f"{folder}/{name}", "unexpected file")
            continue
        if name.split(".", 1)[0] in done:
            continue
        rel = f"{folder}/{name}"
        dups = _orphan_duplicates(store, rel, seen) if seen is not None else []
        if dups:
            report.problem(
                rel,
                f"no status record, and {len(dups)} of its keys are also in ingested shards "
                f"(e.g. {dups[0]} in shard {seen[dups[0]]}); 'manifest repair' moves it aside",
            )
        else:
            report.warning(
                rel, "no status record (an interrupted run? 'manifest repair' moves it aside)"
            )
    status = f"{STATUS_DIR}/ingest" if folder in ("meta", "images") else f"{STATUS_DIR}/{folder}"
    for sub in (folder, status):
        for name in _temp_files(store.url(sub)):
            report.warning(
                f"{sub}/{name}",
                "temporary file left by an interrupted write (the next run or 'manifest repair' deletes it)",
            )


def _orphan_duplicates(store: Store, rel: str, seen: dict[str, str]) -> list[str]:
    try:
        keys = pq.read_table(io.BytesIO(fs.read_bytes(store.url(rel))), columns=["key"])
    except Exception:  # an unreadable orphan duplicates nothing a reader would see
        return []
    return [k for k in keys["key"].to_pylist() if k in seen]


def _temp_files(url: str) -> list[str]:
    """``fs.ls`` hides temp files (``.NAME.tmp-XXXX``); verify wants to see them."""
    fsys, path = fs.filesystem(url)
    if not fsys.exists(path):
        return []
    names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fsys.ls(path, detail=False)]
    return sorted(n for n in names if ".tmp-" in n)


def dumps(info: dict[str, Any]) -> str:
    return json.dumps(info, indent=1, sort_keys=True, default=str)
