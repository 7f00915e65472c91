"""`manifest show|stats|verify`: a clean store verifies; each kind of corruption is named."""

import hashlib
import io
import json
import shutil
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import fs
from pipeline.cli import main
from pipeline.ingest.folder import folder_samples
from pipeline.ingest.writer import IngestConfig, ingest
from pipeline.manifest import ranges, show, stats, verify
from pipeline.store import Store, write_tar


def write_stage(store: Store, stage: str, shard: str, rows: list[dict]) -> None:
    """A Parquet stage output shard following the stage contract, then its status record."""
    checksum = fs.write_parquet(store.url(stage, f"{shard}.parquet"), pa.Table.from_pylist(rows))
    errors = sum(r.get("error") is not None for r in rows)
    store.write_status(
        stage,
        shard,
        {"rows": len(rows), "ok": len(rows) - errors, "errors": errors, "checksum": checksum},
    )


def write_features(store: Store, shard: str, keys: list[str]) -> None:
    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 4), np.float16))
    samples = [(k, {"t5.npy": buf.getvalue(), "json": b"{}"}) for k in keys]
    checksum = write_tar(store.url("features/tiny", f"{shard}.tar"), samples)
    store.write_status(
        "features/tiny",
        shard,
        {
            "rows": len(keys),
            "ok": len(keys),
            "errors": 0,
            "checksum": checksum,
            "output": f"{shard}.tar",
        },
    )


@pytest.fixture(scope="module")
def clean_store(photos_dir, tmp_path_factory):
    """3 shards of real photos; scores everywhere, captions on 2 shards, features on shard 0."""
    store = Store(str(tmp_path_factory.mktemp("manifest") / "store"))
    cfg = IngestConfig(shard_size=2, max_side=96)
    ingest(store, folder_samples(str(photos_dir)), "folder", cfg, progress=False)
    for i, shard in enumerate(store.shards()):
        keys = store.ok_keys(shard)
        write_stage(
            store,
            "scores/clip",
            shard,
            [
                {"key": k, "error": None, "clip_aesthetic": 4.0 + i + j / 2, "sharpness": 100.0 * j}
                for j, k in enumerate(keys)
            ],
        )
        if i < 2:
            write_stage(
                store,
                "captions/tiny",
                shard,
                [
                    {"key": k, "caption": "a photo " * (j + 1), "error": None}
                    for j, k in enumerate(keys)
                ],
            )
    write_features(store, "000000", store.ok_keys("000000"))
    store.refresh_manifest()
    return store


@pytest.fixture()
def store(clean_store, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(clean_store.root, root)
    return Store(str(root))


def messages(report: dict) -> list[str]:
    return [f"{p['path']}: {p['message']}" for p in report["problems"]]


def test_ranges():
    assert ranges(["000001", "000002", "000003", "000007"]) == "000001-000003, 000007"
    assert ranges([]) == ""


def test_show_lists_stage_coverage(clean_store, capsys):
    info = show(clean_store)
    assert info["shards"] == 3 and info["ok"] == 6
    assert (
        info["stages"]["captions/tiny"]["done"] == 2
        and info["stages"]["captions/tiny"]["missing"] == "000002"
    )
    assert main(["manifest", "show", "--store", clean_store.root]) == 0
    out = capsys.readouterr().out
    assert "captions/tiny" in out and "2/3 shards" in out and "missing 000002" in out
    assert main(["manifest", "show", "--store", clean_store.root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["stages"]["scores/clip"]["done"] == 3


def test_stats_has_percentiles_of_sizes_scores_and_caption_length(clean_store, capsys):
    info = stats(clean_store)
    assert info["ok"] == 6 and info["errors"] == 0 and info["bytes_total"] > 0
    assert info["sizes"]["width"]["max"] <= 96 and "aspect" in info["sizes"]
    clip = info["stages"]["scores/clip"]
    assert clip["coverage"] == 1.0 and clip["columns"]["clip_aesthetic"]["min"] == 4.0
    assert clip["columns"]["clip_aesthetic"]["max"] == 6.5
    caps = info["stages"]["captions/tiny"]
    assert caps["coverage"] == pytest.approx(4 / 6, abs=1e-3)
    assert caps["columns"]["caption_words"]["max"] == 4  # "a photo a photo "
    assert main(["manifest", "stats", "--store", clean_store.root]) == 0
    out = capsys.readouterr().out
    assert "clip_aesthetic" in out and "caption_chars" in out and "p50" in out


def test_clean_store_verifies(clean_store, capsys):
    report = verify(clean_store, decode=True)
    assert report["ok"], messages(report)
    assert report["checked"]["image shards"] == 3 and report["checked"]["stage shards"] == 6
    assert report["checked"]["images decoded"] == 6
    assert main(["manifest", "verify", "--store", clean_store.root]) == 0
    assert "verify: OK" in capsys.readouterr().out


def test_verify_names_every_corruption(store, capsys):
    root = store.url()
    # 1. a deleted image shard
    fs.remove(store.image_url("000001"))
    # 2. a flipped byte inside an image of shard 0
    tar_path = store.image_url("000000")
    data = bytearray(open(tar_path, "rb").read())
    data[1024 + 200] ^= 0xFF
    open(tar_path, "wb").write(bytes(data))
    # 3. a row removed from a stage parquet
    t = pq.read_table(f"{root}/scores/clip/000002.parquet")
    pq.write_table(t.slice(0, 1), f"{root}/scores/clip/000002.parquet")
    # 4. keys reordered in another
    t = pq.read_table(f"{root}/captions/tiny/000000.parquet")
    pq.write_table(t.take([1, 0]), f"{root}/captions/tiny/000000.parquet")
    # 5. an orphan output (crash before its status record) and a leftover temp file
    shutil.copy(f"{root}/captions/tiny/000001.parquet", f"{root}/captions/tiny/000002.parquet")
    open(f"{root}/scores/clip/.000000.parquet.tmp-1234abcd", "wb").close()
    # 6. a stage shard for a shard that was never ingested
    write_stage(store, "scores/clip", "000009", [{"key": "x", "error": None}])

    report = verify(store)
    msgs = "\n".join(messages(report))
    assert not report["ok"]
    assert "images/000001.tar: missing" in msgs
    assert "images/000000.tar: checksum mismatch" in msgs
    assert "scores/clip/000002.parquet: 1 rows but the status record says 2" in msgs
    assert (
        "scores/clip/000002.parquet: keys differ from the ok keys of images/000002.tar: 1 missing"
        in msgs
    )
    assert "captions/tiny/000000.parquet: keys out of order" in msgs
    assert (
        "scores/clip/000009.parquet: stage output for shard 000009, which was never ingested"
        in msgs
    )
    warnings = "\n".join(f"{w['path']}: {w['message']}" for w in report["warnings"])
    assert "captions/tiny/000002.parquet: no status record" in warnings
    assert "scores/clip/.000000.parquet.tmp-1234abcd: temporary file" in warnings

    assert main(["manifest", "verify", "--store", root]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM images/000001.tar: missing" in out and "FAILED" in out
    assert main(["manifest", "verify", "--store", root, "--json"]) == 1
    assert len(json.loads(capsys.readouterr().out)["problems"]) == len(report["problems"])


def test_verify_checks_features_tars_and_meta(store):
    keys = store.ok_keys("000000")
    write_features(store, "000000", keys[:1])  # one key short, status record consistent
    meta_path = store.meta_url("000001")
    t = pq.read_table(meta_path)
    pq.write_table(t.slice(0, 1), meta_path)
    msgs = "\n".join(messages(verify(store)))
    assert (
        "features/tiny/000000.tar: keys differ from the ok keys of images/000000.tar: 1 missing"
        in msgs
    )
    assert "meta/000001.parquet: checksum mismatch" in msgs
    assert "meta/000001.parquet: 1 rows but the status record says 2" in msgs


def test_verify_reports_unsafe_members_and_undecodable_images(store):
    keys = store.ok_keys("000000")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in [
            (f"{keys[0]}.jpg", b"not a jpeg"),
            ("../evil.jpg", b"x"),
            (f"{keys[1]}.png", b""),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    open(store.image_url("000000"), "wb").write(buf.getvalue())
    rec = store.status("ingest", "000000")
    rec["checksum"] = hashlib.sha256(buf.getvalue()).hexdigest()  # only the content is bad
    store.write_status(
        "ingest", "000000", {k: v for k, v in rec.items() if k not in ("stage", "shard")}
    )
    fast = "\n".join(messages(verify(store)))
    assert "unsafe tar member path '../evil.jpg'" in fast and "does not decode" not in fast
    slow = "\n".join(messages(verify(store, decode=True)))
    assert f"images/000000.tar: image {keys[0]}.jpg does not decode: not an image" in slow
    assert f"image {keys[1]}.png does not decode: empty file" in slow


def test_verify_of_a_missing_store_is_one_line(tmp_path, capsys):
    assert main(["manifest", "verify", "--store", str(tmp_path / "nope")]) == 2
    assert "no store at" in capsys.readouterr().err
