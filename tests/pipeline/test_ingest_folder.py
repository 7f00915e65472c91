import io
import json
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.ingest.folder import folder_samples
from pipeline.ingest.writer import IngestConfig, ingest
from pipeline.store import Store


def test_folder_ingest_writes_aligned_shards(photos_dir, tmp_path):
    store = Store(str(tmp_path / "store"))
    s = ingest(
        store,
        folder_samples(str(photos_dir)),
        "folder",
        IngestConfig(shard_size=4, max_side=256),
        progress=False,
    )
    assert s.added == 6 and s.ok == 6 and not s.errors
    assert store.shards() == ["000000", "000001"]
    meta = pq.read_table(str(tmp_path / "store" / "meta")).to_pylist()
    assert len({r["key"] for r in meta}) == 6
    assert all(max(r["width"], r["height"]) <= 256 for r in meta)
    with tarfile.open(tmp_path / "store" / "images" / "000000.tar") as tar:
        names = tar.getnames()
        first = next(n for n in names if n.endswith(".jpg"))
        assert Image.open(io.BytesIO(tar.extractfile(first).read())).mode == "RGB"
    assert len([n for n in names if n.endswith(".json")]) == 4
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and set(manifest["shards"]) == {"000000", "000001"}


def test_reingest_adds_nothing(photos_dir, tmp_path, capsys):
    args = ["ingest", "folder", str(photos_dir), "--store", str(tmp_path / "s"), "--no-progress"]
    assert main(args) == 0
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "nothing new" in out
    assert len(Store(str(tmp_path / "s")).shards()) == 1


def test_wrong_path_is_one_line(tmp_path, capsys):
    assert main(["ingest", "folder", str(tmp_path / "nope"), "--store", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such folder" in err


def test_bad_flag_value_is_one_line(photos_dir, tmp_path, capsys):
    assert (
        main(
            [
                "ingest",
                "folder",
                str(photos_dir),
                "--store",
                str(tmp_path / "s"),
                "--shard-size",
                "0",
            ]
        )
        == 2
    )
    assert "argument --shard-size: must be > 0, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("workers", [1, 2])
def test_keys_and_shards_are_deterministic(photos_dir, tmp_path, workers):
    a, b = Store(str(tmp_path / "a")), Store(str(tmp_path / "b"))
    for st in (a, b):
        ingest(
            st,
            folder_samples(str(photos_dir)),
            "folder",
            IngestConfig(shard_size=3, workers=workers),
            progress=False,
        )
    assert [a.read_meta(s)["key"].to_pylist() for s in a.shards()] == [
        b.read_meta(s)["key"].to_pylist() for s in b.shards()
    ]
