"""A store on GCS: gcsfs against gcp-storage-emulator on loopback (its JSON API, in memory).

The chain a user runs — ingest, a stage under its lease, a no-op re-run, a truncated output
redone, verify — plus the sealed status index and the one-line error for a missing bucket.
The emulator does not enforce ``ifGenerationMatch=0`` (what gcsfs sends for an exclusive create),
so the lease's race between two writers is tested on local disks and S3 only.
"""

from __future__ import annotations

import gzip
import json

import pytest
from test_reliability import STAGE, keys_stage, meta_keys, tiny_folder

from pipeline import fs
from pipeline.cli import main
from pipeline.ingest.folder import ingest_folder
from pipeline.lease import LeaseHeld
from pipeline.manifest import verify
from pipeline.stage import run_stage
from pipeline.store import INDEX_NAME, WRITING_NAME, Store


def test_store_on_gcs(gcs_bucket, tmp_path, monkeypatch):
    import pipeline.store

    monkeypatch.setattr(pipeline.store, "INDEX_MIN_RECORDS", 1)  # every stage keeps an index
    root = f"{gcs_bucket}/store"
    src = tiny_folder(tmp_path / "a", 4, "a")
    assert ingest_folder(root, str(src), progress=False, shard_size=1).ok == 4
    store = Store(root)
    assert store.reads == "index"  # an object store: sealed indexes are read
    with store.lease("ingest", owner="someone else"):
        with pytest.raises(LeaseHeld, match="someone else"):
            ingest_folder(root, str(src), progress=False, shard_size=1)

    assert len(run_stage(store, keys_stage(store), progress=False, use_ray=False).done) == 4
    doc = json.loads(gzip.decompress(fs.read_bytes(fs.join(store.status_dir(STAGE), INDEX_NAME))))
    assert doc["sealed"] is True and sorted(doc["records"]) == [f"{i:06d}" for i in range(4)]
    assert not fs.exists(fs.join(store.status_dir(STAGE), WRITING_NAME))
    again = run_stage(Store(root), keys_stage(store), progress=False, use_ray=False)
    assert len(again.skipped) == 4 and not again.done
    assert len(meta_keys(store)) == 4 == len(set(meta_keys(store)))

    # A truncated output is redone (the done check reads sizes from the listing), then verify.
    fs.atomic_write(store.url(STAGE, "000001.parquet"), b"short")
    redo = run_stage(Store(root), keys_stage(store), progress=False, use_ray=False)
    assert redo.done == ["000001"] and "another size" in redo.redo["000001"]
    report = verify(Store(root))
    assert report["ok"], report["problems"]


def test_missing_gcs_bucket_is_one_line(gcs_bucket, capsys):
    rc = main(["manifest", "show", "--store", "gs://no-such-bucket-13/store"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "'gcloud storage buckets create gs://no-such-bucket-13'" in err
