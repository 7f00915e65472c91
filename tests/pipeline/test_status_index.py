"""The per-stage status index: records stay the truth, the index only saves requests.

Locally the tests check what the index returns after records are added, rewritten, deleted and
after the index itself is damaged; on the moto S3 endpoint they count the HTTP requests a stage's
state costs, which must not grow with the number of shards.
"""

from __future__ import annotations

import gzip
import json

import pytest

from pipeline import fs, manifest
from pipeline.store import INDEX_MIN_RECORDS, INDEX_NAME, Store

STAGE = "captions/t"


def _make_store(root: str, shards: int, stage_shards: int) -> Store:
    """A store with ``shards`` ingest records and ``stage_shards`` records (and small output
    files) of STAGE, written in one concurrent batch (records as the workers write them)."""
    store = Store(root)
    store.create()
    store.claim_stage(STAGE, {"model": "t"})
    files: dict[str, bytes] = {}
    for stage, n in (("ingest", shards), (STAGE, stage_shards)):
        for i in range(n):
            shard = f"{i:06d}"
            rec = {"stage": stage, "shard": shard, "rows": 9, "ok": 9, "errors": 0}
            if stage != "ingest":
                files[store.url(STAGE, f"{shard}.parquet")] = b"output"
                rec["output_bytes"] = len(b"output")
            files[store.status_url(stage, shard)] = json.dumps(rec).encode()
    for folder in (store.status_dir("ingest"), store.status_dir(STAGE), store.url(STAGE)):
        fs.makedirs(folder)  # a local store's folders (none on S3)
    fsys, _ = fs.filesystem(root)
    fsys.pipe({fsys._strip_protocol(u): data for u, data in files.items()})
    return store


def _index_bytes(store: Store, stage: str) -> bytes:
    return fs.read_bytes(fs.join(store.status_dir(stage), INDEX_NAME))


def test_index_follows_the_records(tmp_path, caplog):
    n = INDEX_MIN_RECORDS + 4
    store = _make_store(str(tmp_path / "s"), shards=n + 2, stage_shards=n)
    store.refresh_manifest()
    doc = json.loads(gzip.decompress(_index_bytes(store, STAGE)))
    assert sorted(doc["records"]) == [f"{i:06d}" for i in range(n)]
    assert sorted(doc["marks"]) == sorted(doc["records"])

    # Another process rewrites one record, adds one and deletes one: a fresh Store that starts
    # from the persisted index sees exactly the records.
    other = Store(store.root)
    other.write_status(STAGE, "000001", {"rows": 123456, "errors": 7})
    other.write_status(STAGE, f"{n:06d}", {"rows": 9, "errors": 0})
    fs.remove(store.status_url(STAGE, "000002"))
    fresh = Store(store.root)
    done = fresh.completed(STAGE)
    expected = sorted({f"{i:06d}" for i in range(n + 1)} - {"000002"})
    assert sorted(done) == expected
    assert done["000001"]["rows"] == 123456
    # ... and so does the Store that built the index (its in-memory copy is checked too).
    assert store.completed(STAGE) == done

    # Reading does not write the index (read-only commands work on a read-only copy) …
    before = _index_bytes(store, STAGE)
    info = manifest.show(Store(store.root))
    assert info["stages"][STAGE]["done"] == n
    assert _index_bytes(store, STAGE) == before
    # … a driver's refresh does, and the manifest follows.
    m = fresh.refresh_manifest()
    assert sorted(m["stages"][STAGE]["shards"]) == expected
    doc = json.loads(gzip.decompress(_index_bytes(store, STAGE)))
    assert doc["records"]["000001"]["rows"] == 123456 and "000002" not in doc["records"]

    # A damaged index is rebuilt from the records, with a warning.
    fs.atomic_write(fs.join(store.status_dir(STAGE), INDEX_NAME), b"not gzip")
    with caplog.at_level("WARNING", logger="pipeline.store"):
        assert sorted(Store(store.root).completed(STAGE)) == sorted(done)
    assert "rebuilding it from the status records" in caplog.text


def test_background_refresh_then_blocking_refresh(tmp_path):
    store = _make_store(str(tmp_path / "s"), shards=5, stage_shards=5)
    assert store.refresh_manifest(background=True) is None  # returns at once
    store.write_status(STAGE, "000004", {"rows": 8, "errors": 1})
    m = store.refresh_manifest()  # waits for the background one, then reads the new record
    assert m["stages"][STAGE]["shards"]["000004"]["rows"] == 8
    assert (
        json.loads(fs.read_text(store.manifest_url))["stages"][STAGE]["shards"]["000004"]["errors"]
        == 1
    )


def test_store_pickles_without_its_caches(tmp_path):
    import pickle

    store = _make_store(str(tmp_path / "s"), shards=2, stage_shards=2)
    store.completed(STAGE)
    copy = pickle.loads(pickle.dumps(store))
    assert copy == store and copy._indexes == {}
    assert sorted(copy.completed(STAGE)) == ["000000", "000001"]


class _Requests:
    """Counts the HTTP requests s3fs sends (botocore's before-send event), by method."""

    def __init__(self, url: str):
        fsys, _ = fs.filesystem(url)
        fsys.connect()
        self.calls: list[tuple[str, str]] = []
        fsys.s3.meta.events.register("before-send.s3", self._hook)

    def _hook(self, request, **kwargs):
        self.calls.append((request.method, request.url))

    def take(self) -> list[tuple[str, str]]:
        out, self.calls = self.calls, []
        return out


@pytest.mark.parametrize("n", [INDEX_MIN_RECORDS])
def test_stage_state_costs_constant_requests_on_s3(s3_bucket, n):
    store = _make_store(f"{s3_bucket}/store", shards=n, stage_shards=n)
    requests = _Requests(store.root)
    store.refresh_manifest()  # first build: every record read once, concurrently
    first = requests.take()
    assert (
        sum(1 for m, u in first if m == "GET" and u.endswith(".json") and "/_status/" in u) >= 2 * n
    )

    # A new process reading a stage's state: one listing and one index object, no record.
    assert len(Store(store.root).completed(STAGE)) == n
    calls = requests.take()
    assert len(calls) <= 3, calls
    assert not [u for _, u in calls if u.endswith(f"{n - 1:06d}.json")]

    # Two records rewritten elsewhere: the listing shows them, only they are read again.
    reader = Store(store.root)
    reader.completed(STAGE)
    Store(store.root).write_status(STAGE, "000003", {"rows": 1, "errors": 8})
    Store(store.root).write_status(STAGE, "000007", {"rows": 2, "errors": 7})
    requests.take()
    done = reader.completed(STAGE)
    calls = requests.take()
    assert done["000003"]["errors"] == 8 and done["000007"]["errors"] == 7
    assert len(calls) == 4, calls  # the index check, the listing, the two records

    # `manifest show` on the whole store: a handful of requests, not one per shard.
    Store(store.root).refresh_manifest()
    requests.take()
    info = manifest.show(Store(store.root))
    calls = requests.take()
    assert info["stages"][STAGE]["done"] == n and info["shards"] == n
    assert len(calls) <= 12, calls


def test_no_stale_listing_on_s3(s3_bucket):
    """A record written after this process listed the stage is seen at the next look (s3fs's
    listing cache once hid the records Ray actors wrote from the driver)."""
    store = _make_store(f"{s3_bucket}/store", shards=3, stage_shards=1)
    assert sorted(store.completed(STAGE)) == ["000000"]
    Store(store.root).write_status(STAGE, "000001", {"rows": 9, "errors": 0})
    assert sorted(store.completed(STAGE)) == ["000000", "000001"]
    m = store.refresh_manifest()
    assert sorted(m["stages"][STAGE]["shards"]) == ["000000", "000001"]


def test_listing_snapshot_shares_listings_until_a_write(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.json").write_text("{}")
    url = str(folder)
    with fs.ListingSnapshot():
        assert fs.ls(url) == ["a.json"]
        (folder / "b.json").write_text("{}")  # behind this module's back: not seen yet
        assert fs.ls(url) == ["a.json"] and sorted(fs.sizes(url)) == ["a.json"]
        fs.atomic_write(fs.join(url, "c.json"), "{}")  # a write through fs: listed again
        assert fs.ls(url) == ["a.json", "b.json", "c.json"]
    (folder / "d.json").write_text("{}")
    assert fs.ls(url) == ["a.json", "b.json", "c.json", "d.json"]  # no snapshot: always fresh


class _NeverCalled:
    """The worker of a no-op run: every shard is done, so it must not run."""

    def __call__(self, shard: str) -> dict:
        raise AssertionError(f"shard {shard} was not skipped")


def test_noop_stage_run_requests_do_not_grow_with_shards_on_s3(s3_bucket):
    from pipeline.stage import StageSpec, run_stage

    counts = {}
    for n in (INDEX_MIN_RECORDS, 2 * INDEX_MIN_RECORDS):
        store = _make_store(f"{s3_bucket}/s{n}", shards=n, stage_shards=n)
        spec = StageSpec(STAGE, _NeverCalled, {}, settings={"model": "t"})
        run_stage(store, spec, progress=False, use_ray=False)  # builds the indexes
        requests = _Requests(store.root)
        summary = run_stage(Store(store.root), spec, progress=False, use_ray=False)
        assert len(summary.skipped) == n and not summary.done
        counts[n] = len(requests.take())
    # One listing per folder (ingest records, stage records, stage outputs), whatever the count.
    small, big = counts.values()
    assert small == big and big < 40, counts


def test_small_stages_keep_no_index_object(tmp_path):
    store = _make_store(str(tmp_path / "s"), shards=3, stage_shards=3)
    store.refresh_manifest()
    assert not fs.exists(fs.join(store.status_dir(STAGE), INDEX_NAME))
    assert sorted(Store(store.root).completed(STAGE)) == ["000000", "000001", "000002"]


class _Writer:
    """A stage worker: writes the shard's output file, then its status record."""

    def __init__(self, root: str):
        self.store = Store(root)

    def __call__(self, shard: str) -> dict:
        fs.atomic_write(self.store.url(STAGE, f"{shard}.parquet"), b"output")
        return self.store.write_status(STAGE, shard, {"rows": 9, "ok": 9, "errors": 0})


def test_sealed_index_is_the_state_between_writers(tmp_path, monkeypatch):
    """Sealed-index reads (the object-store default, forced here on a local store): after a
    writer ends, its stage is read from the index alone; a killed writer's marker makes readers
    list again until the next writer seals; an edit by hand shows in the listing only."""
    from pipeline.stage import StageSpec, run_stage
    from pipeline.store import WRITING_NAME

    monkeypatch.setenv("ALPHASET_STATUS_READS", "index")
    n = INDEX_MIN_RECORDS + 5
    store = _make_store(str(tmp_path / "s"), shards=n, stage_shards=n - 5)
    with store.writing("ingest"):  # an ingest that ends: seals the ingest records
        pass
    spec = StageSpec(STAGE, _Writer, {"root": store.root}, settings={"model": "t"})
    assert len(run_stage(store, spec, progress=False, use_ray=False).done) == 5
    marker = fs.join(store.status_dir(STAGE), WRITING_NAME)
    doc = json.loads(gzip.decompress(_index_bytes(store, STAGE)))
    assert doc["sealed"] is True and len(doc["records"]) == n and not fs.exists(marker)

    listed: list[tuple[str, str]] = []
    real = fs.listing

    def spy(url: str, stem: str = "") -> dict[str, str]:
        listed.append((url.split("/_status/")[-1], stem))
        return real(url, stem)

    monkeypatch.setattr(fs, "listing", spy)
    summary = run_stage(Store(store.root), spec, progress=False, use_ray=False)
    assert len(summary.skipped) == n and not summary.done
    assert listed and all(stem == "_" for _, stem in listed), listed  # no record listed
    assert len(Store(store.root).completed(STAGE)) == n and listed[-1] == (STAGE, "_")

    # A writer killed after writing a record: its marker stays; readers list and see the record.
    with pytest.raises(RuntimeError), Store(store.root).writing(STAGE):
        Store(store.root).write_status(STAGE, "000001", {"rows": 77, "ok": 77, "errors": 0})
        raise RuntimeError("killed")
    assert fs.exists(marker)
    listed.clear()
    assert Store(store.root).completed(STAGE)["000001"]["rows"] == 77
    assert (STAGE, "") in listed
    # The next writer lists once, seals, removes the marker; readers trust the index again.
    run_stage(Store(store.root), spec, progress=False, use_ray=False)
    assert not fs.exists(marker)
    listed.clear()
    assert Store(store.root).completed(STAGE)["000001"]["rows"] == 77
    assert all(stem == "_" for _, stem in listed), listed

    # A record deleted by hand after the seal: the index still says done (the documented limit),
    # the listing does not; list-mode reads (ALPHASET_STATUS_READS=list) follow the records.
    fs.remove(store.status_url(STAGE, "000002"))
    assert "000002" in Store(store.root).completed(STAGE)
    truth = Store(store.root, reads="list").completed(STAGE)
    assert "000002" not in truth
    assert Store(store.root).sealed_index_drift(STAGE, truth) == ["000002"]
    redo = run_stage(Store(store.root, reads="list"), spec, progress=False, use_ray=False)
    assert redo.done == ["000002"]
    truth = Store(store.root, reads="list").completed(STAGE)
    assert "000002" in truth and Store(store.root).sealed_index_drift(STAGE, truth) == []


def test_seal_waits_for_a_listing_that_started_after_the_workers(tmp_path, monkeypatch):
    """A background refresh that was listing while the last worker wrote its record and the
    run finished must not count as the final listing: the seal lists again."""
    import threading

    monkeypatch.setenv("ALPHASET_STATUS_READS", "index")
    n = INDEX_MIN_RECORDS
    store = _make_store(str(tmp_path / "s"), shards=n + 1, stage_shards=n)
    release, listed = threading.Event(), threading.Event()
    real = fs.listing

    def slow(url: str, stem: str = "") -> dict[str, str]:
        out = real(url, stem)
        if not stem and threading.current_thread() is not threading.main_thread():
            listed.set()
            release.wait(30)  # the listing is taken; the run ends meanwhile
        return out

    monkeypatch.setattr(fs, "listing", slow)
    with store.writing(STAGE) as run:
        run.dispatch()
        store.refresh_manifest(stages=[STAGE], background=True)
        assert listed.wait(30)
        Store(store.root).write_status(STAGE, f"{n:06d}", {"rows": 1, "ok": 1, "errors": 0})
        run.finish()
        release.set()
    doc = json.loads(gzip.decompress(_index_bytes(store, STAGE)))
    assert doc["sealed"] and f"{n:06d}" in doc["records"]


def test_a_stage_that_shrinks_below_the_index_size_drops_its_sealed_index(tmp_path, monkeypatch):
    import pipeline.store

    monkeypatch.setenv("ALPHASET_STATUS_READS", "index")
    monkeypatch.setattr(pipeline.store, "INDEX_MIN_RECORDS", 3)
    store = _make_store(str(tmp_path / "s"), shards=4, stage_shards=4)
    with store.writing(STAGE):
        pass
    assert json.loads(gzip.decompress(_index_bytes(store, STAGE)))["sealed"]
    with Store(store.root).writing(STAGE) as w:
        for shard in ("000000", "000001"):
            w.dispatch()
            Store(store.root).remove_status(STAGE, shard)
        w.finish()
    assert not fs.exists(fs.join(store.status_dir(STAGE), INDEX_NAME))
    assert sorted(Store(store.root).completed(STAGE)) == ["000002", "000003"]


def test_a_reused_store_checks_again_at_each_writer(tmp_path, monkeypatch):
    """A Store that wrote a small stage (no index object) and writes it again later sees what
    another process wrote in between."""
    monkeypatch.setenv("ALPHASET_STATUS_READS", "index")
    store = _make_store(str(tmp_path / "s"), shards=6, stage_shards=5)
    with store.writing(STAGE):
        assert len(store.completed(STAGE)) == 5
    other = Store(store.root)
    with other.writing(STAGE):
        other.write_status(STAGE, "000005", {"rows": 9, "ok": 9, "errors": 0})
    with store.writing(STAGE):
        assert "000005" in store.completed(STAGE)


class _TwoStages:
    """A worker that writes the records of two stages (as score writes embeddings/<tag>)."""

    def __init__(self, root: str):
        self.store = Store(root)

    def __call__(self, shard: str) -> dict:
        fs.atomic_write(self.store.url("embeddings/t", f"{shard}.parquet"), b"emb")
        self.store.write_status("embeddings/t", shard, {"rows": 9, "ok": 9, "errors": 0})
        fs.atomic_write(self.store.url(STAGE, f"{shard}.parquet"), b"output")
        return self.store.write_status(STAGE, shard, {"rows": 9, "ok": 9, "errors": 0})


def test_the_other_stage_a_run_writes_is_marked_and_sealed_too(tmp_path, monkeypatch):
    import pipeline.store
    from pipeline.stage import StageSpec, run_stage

    monkeypatch.setenv("ALPHASET_STATUS_READS", "index")
    monkeypatch.setattr(pipeline.store, "INDEX_MIN_RECORDS", 1)
    store = _make_store(str(tmp_path / "s"), shards=3, stage_shards=0)
    spec = StageSpec(STAGE, _TwoStages, {"root": store.root}, settings={"model": "t"},
                     also_writes=("embeddings/t",))  # fmt: skip
    assert len(run_stage(store, spec, progress=False, use_ray=False).done) == 3
    for stage in (STAGE, "embeddings/t"):
        assert json.loads(gzip.decompress(_index_bytes(store, stage)))["sealed"], stage
    # more shards ingested, the stage run again: both stages' readers see the new records
    for shard in ("000003", "000004"):
        store.write_status("ingest", shard, {"rows": 9, "ok": 9, "errors": 0})
    with Store(store.root).writing("ingest"):
        pass
    assert len(run_stage(Store(store.root), spec, progress=False, use_ray=False).done) == 2
    assert len(Store(store.root).completed("embeddings/t")) == 5


def test_a_reader_never_unseals_what_a_writer_sealed(tmp_path, monkeypatch):
    """A driver that read ingest while an ingest ran (so listed it) keeps its copy; when it
    refreshes its own stage after the ingest sealed, it must not write that copy back unsealed."""
    monkeypatch.setenv("ALPHASET_STATUS_READS", "index")
    n = INDEX_MIN_RECORDS
    store = _make_store(str(tmp_path / "s"), shards=n, stage_shards=1)
    ingest = Store(store.root)
    driver = Store(store.root)
    with ingest.writing("ingest"):
        assert len(driver.completed("ingest")) == n  # the marker is up: listed
        ingest.write_status("ingest", f"{n:06d}", {"rows": 9, "ok": 9, "errors": 0})
    assert json.loads(gzip.decompress(_index_bytes(store, "ingest")))["sealed"]
    driver.refresh_manifest(stages=[STAGE])
    doc = json.loads(gzip.decompress(_index_bytes(store, "ingest")))
    assert doc["sealed"] and len(doc["records"]) == n + 1


def test_a_writer_whose_lease_was_taken_over_seals_nothing(tmp_path, monkeypatch):
    """A writer suspended past its lease's expiry while another took the lease over must not
    seal on resuming (the renewal thread may not have noticed yet): marker and index stay."""
    from pipeline.store import WRITING_NAME

    monkeypatch.setenv("ALPHASET_STATUS_READS", "index")
    n = INDEX_MIN_RECORDS
    store = _make_store(str(tmp_path / "s"), shards=n, stage_shards=n)
    with store.lease(STAGE) as lease, store.writing(STAGE, lease=lease):
        store.write_status(STAGE, "000001", {"rows": 5, "ok": 5, "errors": 0})
        fs.atomic_write(lease._url(lease.gen + 1), lease._payload())  # another writer took it
    assert fs.exists(fs.join(store.status_dir(STAGE), WRITING_NAME))
    assert not fs.exists(fs.join(store.status_dir(STAGE), INDEX_NAME))
