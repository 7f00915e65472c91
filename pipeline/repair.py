"""Putting a store back in order: ``alphaset manifest repair`` and the clean-up every writer does
when it starts (under its lease, so nobody else is writing what it moves).

The status records are the truth (see `pipeline.store`); everything else is made to agree:

- ``manifest.json`` is rebuilt from the status records.
- A shard file with no status record (a crash between a write and its record, or a record that
  was deleted) is moved aside to ``STORE/_quarantine/<time>/`` — never deleted, never read —
  so its keys cannot appear twice. Temp files of interrupted writes (``.NAME.tmp-XXXX``) are
  incomplete by construction: a writer starting deletes them, ``repair`` moves them aside too.
- A status record that cannot be read, or whose files are missing or fail their checksum, is
  removed (the files go to quarantine), so the next run of that stage — or of ingest, from the
  source — redoes that shard. One exception keeps acknowledged images: an ingest shard whose meta
  file changed after its record (a `--retry-errors` rewrite cut short) but still agrees with its
  intact image tar gets a fresh record instead.
- A stage shard of an image shard that is no longer ingested is quarantined too.
- An error row of ingest whose key was ingested again later (``--retry-errors``) is dropped from
  its old meta shard.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import io
import logging
from collections import Counter
from typing import Any

import pyarrow.parquet as pq

from pipeline import fs
from pipeline.store import STATUS_DIR, Store, StoreError, sha256_bytes

log = logging.getLogger(__name__)


def stamp() -> str:
    """A quarantine folder name: the UTC time of this run."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S")


def _temp_leftovers(store: Store, rel_folder: str) -> list[str]:
    return [f"{rel_folder}/{n}" for n in fs.ls_fresh(store.url(rel_folder)) if ".tmp-" in n]


def _clear_temps(
    store: Store, folders: list[str], actions: list[str], when: str, keep: bool = False
) -> None:
    """Temp files of interrupted writes: deleted (a writer starting), or with ``keep`` moved to
    quarantine (``manifest repair``, which deletes nothing)."""
    for folder in folders:
        for rel in _temp_leftovers(store, folder):
            try:
                if keep:
                    dst = store.quarantine(rel, when)
                    actions.append(f"moved {rel} to {dst} (temp file of an interrupted write)")
                else:
                    fs.remove(store.url(rel))
                    actions.append(f"deleted {rel} (temp file of an interrupted write)")
            except FileNotFoundError:
                pass


def _quarantine_orphans(
    store: Store,
    folder: str,
    suffixes: tuple[str, ...],
    done: set[str],
    when: str,
    actions: list[str],
) -> None:
    """Move files of ``folder`` whose shard has no status record to quarantine."""
    for name in fs.ls(store.url(folder)):
        if name.startswith(("_", ".")) or not name.endswith(suffixes):
            continue
        shard = name.split(".", 1)[0]
        if shard.isdigit() and shard not in done:
            dst = store.quarantine(f"{folder}/{name}", when)
            actions.append(f"moved {folder}/{name} to {dst} (no status record)")


# ---- what every writer does first ----------------------------------------------------------------
def clean_ingest(store: Store, when: str | None = None, keep: bool = False) -> list[str]:
    """Under the ingest lease: temp leftovers of images/, meta/ and their status records deleted
    (``keep``: quarantined), image and meta files without a status record quarantined,
    superseded error rows dropped."""
    actions: list[str] = []
    when = when or stamp()
    _clear_temps(store, ["images", "meta", f"{STATUS_DIR}/ingest"], actions, when, keep)
    done = set(store.shards())
    _quarantine_orphans(store, "images", (".tar",), done, when, actions)
    _quarantine_orphans(store, "meta", (".parquet",), done, when, actions)
    actions.extend(drop_superseded_errors(store))
    return actions


def clean_stage(store: Store, stage: str, when: str | None = None, keep: bool = False) -> list[str]:
    """Under the lease of ``stage``: its temp leftovers deleted (``keep``: quarantined), its
    output files without a status record and its shards of no-longer-ingested image shards
    quarantined."""
    actions: list[str] = []
    when = when or stamp()
    # A writer that began from a sealed index with no marker in the folder (no killed writer
    # since the seal) has nothing half-written among the records: no need to list them.
    # (repair — keep — always looks.)
    clean = store.sealed_clean(stage) and not keep
    folders = [stage] if clean else [stage, f"{STATUS_DIR}/{stage}"]
    _clear_temps(store, folders, actions, when, keep)
    ingested = set(store.shards())
    for shard, rec in sorted(store.completed(stage).items()):
        if shard not in ingested:
            actions.extend(
                _drop_stage_shard(store, stage, shard, rec, when, "image shard not ingested")
            )
    done = set(store.completed(stage))
    _quarantine_orphans(store, stage, (".parquet", ".tar"), done, when, actions)
    return actions


def _drop_stage_shard(
    store: Store, stage: str, shard: str, rec: dict[str, Any] | None, when: str, why: str
) -> list[str]:
    """Remove a stage shard's status record (first, so the shard reads as not done) and move its
    output aside."""
    actions = []
    status = f"{STATUS_DIR}/{stage}/{shard}.json"
    if fs.exists(store.url(status)):
        store.quarantine(status, when)
    actions.append(
        f"{stage} shard {shard}: removed its status record ({why}); the next run redoes it"
    )
    for rel in store.output_names(stage, shard, rec or {}).values():
        if fs.exists(store.url(rel)):
            dst = store.quarantine(rel, when)
            actions.append(f"moved {rel} to {dst}")
    return actions


# ---- error rows superseded by --retry-errors ------------------------------------------------------
def drop_superseded_errors(store: Store) -> list[str]:
    """Drop each error row of meta whose key appears again in a later shard (``--retry-errors``
    wrote the retried sample there), so every key is in the store once."""
    last: dict[str, str] = {}
    tables = {}
    for shard in store.shards():
        t = store.read_meta(shard, ["key", "status"])
        tables[shard] = t
        for k in t["key"].to_pylist():
            last[k] = shard
    actions = []
    for shard, t in tables.items():
        stale = {
            k
            for k, s in zip(t["key"].to_pylist(), t["status"].to_pylist(), strict=True)
            if s != "ok" and last[k] != shard
        }
        if stale:
            rewrite_meta_without(store, shard, stale)
            actions.append(
                f"meta/{shard}.parquet: dropped {len(stale)} error row(s) retried in a later shard"
            )
    return actions


def rewrite_meta_without(store: Store, shard: str, keys: set[str]) -> None:
    """Rewrite meta shard ``shard`` without the error rows of ``keys`` and update its record.

    Only error rows go (they have no image), so the image tar and every stage output of the shard
    stay valid. The meta file is written before its record; `repair` recognises the state a crash
    between the two leaves (see the module docstring)."""
    import pyarrow.compute as pc

    from pipeline.ingest.writer import error_category

    table = store.read_meta(shard)
    drop = pc.and_(
        pc.is_in(table["key"], value_set=_array(keys)), pc.not_equal(table["status"], "ok")
    )
    table = table.filter(pc.invert(drop))
    checksum = fs.write_parquet(store.meta_url(shard), table)
    rec = dict(store.status("ingest", shard) or {})
    errors = Counter(
        error_category(e or "unknown")
        for e, s in zip(table["error"].to_pylist(), table["status"].to_pylist(), strict=True)
        if s != "ok"
    )
    rec.update(
        rows=table.num_rows,
        errors=sum(errors.values()),
        errors_by_reason=dict(errors),
        meta_checksum=checksum,
    )
    rec.pop("meta_bytes", None)
    for k in ("stage", "shard", "tool_version", "time"):
        rec.pop(k, None)
    store.write_status("ingest", shard, rec)


def _array(keys: set[str]):
    import pyarrow as pa

    return pa.array(sorted(keys), type=pa.string())


# ---- manifest repair ------------------------------------------------------------------------------
def repair(store: Store) -> dict[str, Any]:
    """Make the store consistent (see the module docstring); returns ``{"actions": [...]}``.

    Takes every writer lease of the store first, so it never moves what a running writer writes.
    """
    from pipeline.lease import INGEST

    store.check_root()
    if not fs.exists(store.url("meta")) and not fs.exists(store.manifest_url):
        store.require()
    stages = store.stages()
    with store.leases([INGEST, *stages]) as leases, contextlib.ExitStack() as writing:
        for stage, lease in zip([INGEST, *stages], leases.leases, strict=True):
            writing.enter_context(store.writing(stage, lease=lease))  # sealed again at the end
        when = stamp()
        actions: list[str] = []
        actions.extend(_repair_records(store, "ingest", when))
        actions.extend(_repair_ingest_files(store, when))
        actions.extend(clean_ingest(store, when, keep=True))
        for stage in stages:
            actions.extend(_repair_records(store, stage, when))
            actions.extend(_repair_stage_files(store, stage, when))
            actions.extend(clean_stage(store, stage, when, keep=True))
        try:
            store.read_manifest()
        except StoreError as e:
            actions.append(f"manifest.json was unreadable ({str(e).split(';')[0]}); rebuilt")
        store.refresh_manifest()
        actions.append("rebuilt manifest.json from the status records")
    return {"store": store.root, "actions": actions, "quarantine": f"_quarantine/{when}"}


def _repair_records(store: Store, stage: str, when: str) -> list[str]:
    """Status records (and a stage config) that cannot be read are moved to quarantine."""
    problems: list[tuple[str, str]] = []
    store.completed(stage, problems=problems)
    actions = []
    for url, _ in problems:
        name = url.rsplit("/", 1)[-1]
        rel = f"{STATUS_DIR}/{stage}/{name}"
        store.quarantine(rel, when)
        actions.append(f"{rel}: unreadable status record moved to quarantine; the shard is redone")
    if stage != "ingest":
        try:
            store.stage_config(stage)
        except StoreError:
            rel = f"{STATUS_DIR}/{stage}/config.json"
            store.quarantine(rel, when)
            actions.append(
                f"{rel}: unreadable stage config moved to quarantine (the next run records it)"
            )
    return actions


def _file_sha(store: Store, rel: str) -> str | None:
    try:
        return sha256_bytes(fs.read_bytes(store.url(rel)))
    except FileNotFoundError:
        return None


def _repair_ingest_files(store: Store, when: str) -> list[str]:
    """Ingest shards whose tar or meta is missing or fails its checksum lose their record (their
    keys come back from the source on the next ingest), unless only the meta changed and it
    still agrees with the intact tar (a cut-short rewrite): then the record is renewed."""
    actions = []
    for shard, rec in sorted(store.completed("ingest").items()):
        tar_rel, meta_rel = f"images/{shard}.tar", f"meta/{shard}.parquet"
        tar_sha, meta_sha = _file_sha(store, tar_rel), _file_sha(store, meta_rel)
        tar_ok = tar_sha is not None and tar_sha == rec.get("checksum")
        meta_ok = meta_sha is not None and meta_sha == rec.get("meta_checksum")
        if tar_ok and meta_ok:
            continue
        if tar_ok and meta_sha is not None and _meta_agrees(store, shard, rec):
            table = store.read_meta(shard, ["key", "status"])
            keep = rec.copy()
            for k in ("stage", "shard", "tool_version", "time", "meta_bytes"):
                keep.pop(k, None)
            keep.update(
                rows=table.num_rows,
                errors=sum(1 for s in table["status"].to_pylist() if s != "ok"),
                meta_checksum=meta_sha,
            )
            store.write_status("ingest", shard, keep)
            actions.append(
                f"{meta_rel}: changed after its status record but agrees with {tar_rel}; record renewed"
            )
            continue
        why = []
        for rel, sha, good in ((tar_rel, tar_sha, tar_ok), (meta_rel, meta_sha, meta_ok)):
            if sha is None:
                why.append(f"{rel} missing")
            elif not good:
                why.append(f"{rel} fails its checksum")
        store.quarantine(f"{STATUS_DIR}/ingest/{shard}.json", when)
        actions.append(
            f"ingest shard {shard}: removed its status record ({', '.join(why)}); "
            "its files go to quarantine and the next ingest of its source adds its samples again"
        )
    return actions


def _meta_agrees(store: Store, shard: str, rec: dict[str, Any]) -> bool:
    """The meta file's ok keys are exactly the tar's keys, and it has the record's ok count."""
    from pipeline.store import iter_tar_samples

    try:
        t = pq.read_table(
            io.BytesIO(fs.read_bytes(store.meta_url(shard))), columns=["key", "status"]
        )
        ok = [
            k
            for k, s in zip(t["key"].to_pylist(), t["status"].to_pylist(), strict=True)
            if s == "ok"
        ]
        tar_keys = [k for k, _ in iter_tar_samples(store.image_url(shard))]
    except Exception as e:  # a damaged file of any kind means: does not agree
        log.debug("meta %s does not agree: %s", shard, e)
        return False
    return ok == tar_keys and int(rec.get("ok", -1)) == len(ok)


def _repair_stage_files(store: Store, stage: str, when: str) -> list[str]:
    """Stage shards whose output is missing or fails its checksum lose their record."""
    actions = []
    for shard, rec in sorted(store.completed(stage).items()):
        for rel in store.output_names(stage, shard, rec).values():
            sha = _file_sha(store, rel)
            if sha is None:
                why = f"{rel} missing"
            elif rec.get("checksum") and sha != rec["checksum"]:
                why = f"{rel} fails its checksum"
            else:
                continue
            actions.extend(_drop_stage_shard(store, stage, shard, rec, when, why))
            break
    return actions
