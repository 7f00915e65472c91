import io
import json
import shutil
import tarfile

import polars as pl
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.ingest.writer import IngestConfig, ingest
from pipeline.store import Store
from sam_data.captions import _ID_PATTERN
from sam_data.ingest import sa_key, sam_samples


def meta_rows(store_dir) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(str(store_dir / "meta")).to_pylist()}


def ingest_cli(*args) -> int:
    return main(["ingest", "sam", *map(str, args), "--no-progress"])


def test_tars_give_keys_image_ids_and_mask_counts(tmp_path, sa_members, make_tar, sa_photos):
    t0 = make_tar(tmp_path / "sa_000000.tar", sa_members([10, 11]))
    t1 = make_tar(tmp_path / "sa_000001.tar", sa_members([12, 13, 14]))
    assert ingest_cli(t0, t1, "--store", tmp_path / "s", "--shard-size", "3") == 0
    store = Store(str(tmp_path / "s"))
    assert store.shards() == ["000000", "000001"]
    rows = meta_rows(tmp_path / "s")
    assert sorted(rows) == ["sa_10", "sa_11", "sa_12", "sa_13", "sa_14"]
    for i in range(10, 15):
        r = rows[f"sa_{i}"]
        w, h = Image.open(io.BytesIO(sa_photos[i % len(sa_photos)])).size
        assert (r["status"], r["source"], r["image_id"], r["n_masks"]) == (
            "ok",
            "sam",
            i,
            i % 7 + 1,
        )
        assert (r["width"], r["height"]) == (w, h)
        meta = json.loads(r["source_meta"])
        assert meta == {
            "image_id": i,
            "width": w,
            "height": h,
            "file_name": f"sa_{i}.jpg",
            "tar": "sa_000000.tar" if i < 12 else "sa_000001.tar",
        }
    assert rows["sa_12"]["path"] == "sa_000001.tar:sa_12.jpg"
    # The stored sidecar json carries the same facts, never the masks.
    with tarfile.open(store.image_url("000000")) as tar:
        side = json.loads(tar.extractfile("sa_10.json").read())
    assert side["n_masks"] == 10 % 7 + 1 and "annotations" not in json.dumps(side)
    # Plain polars reads the meta folder: the columns exist with their types.
    df = pl.read_parquet(str(tmp_path / "s" / "meta" / "*.parquet"))
    assert df["n_masks"].sum() == sum(i % 7 + 1 for i in range(10, 15))


def test_folder_of_tars_and_extracted_folder_give_the_same_samples(tmp_path, sa_members, make_tar):
    tars = tmp_path / "tars"
    tars.mkdir()
    make_tar(tars / "sa_000001.tar", [(f"./{n}", d) for n, d in sa_members([3, 4])])
    make_tar(tars / "000000.tar", sa_members([9]))  # a store's shard, not an SA-1B tar
    make_tar(tars / "sa_000000.tar", sa_members([1, 2]))
    (tars / "sa_000002.tar.part").write_bytes(b"half a download")
    (tars / ".sa_000000.tar.verified").write_text("{}")
    extracted = tmp_path / "extracted" / "sa_000000"
    extracted.mkdir(parents=True)
    for name, data in sa_members([1, 2, 3, 4]):
        (extracted / name).write_bytes(data)
    (extracted / "notes.txt").write_text("not an SA-1B file")
    a = [(s.key, s.image_id, s.n_masks) for s in sam_samples([str(tars)])]
    b = [(s.key, s.image_id, s.n_masks) for s in sam_samples([str(tmp_path / "extracted")])]
    assert a == b == [(f"sa_{i}", i, i % 7 + 1) for i in (1, 2, 3, 4)]


def test_unsafe_members_are_error_rows_and_never_written(tmp_path, sa_members, make_tar, capsys):
    members = sa_members([5])
    members += [("../sa_6.jpg", members[0][1]), ("/tmp/sa_7.jpg", members[0][1])]
    (tmp_path / "in").mkdir()
    tar = make_tar(tmp_path / "in" / "sa_000000.tar", members)
    assert ingest_cli(tar, "--store", tmp_path / "s") == 0
    rows = meta_rows(tmp_path / "s")
    bad = [r for r in rows.values() if r["status"] == "error"]
    assert sorted(r["path"] for r in bad) == [
        "sa_000000.tar:../sa_6.jpg",
        "sa_000000.tar:/tmp/sa_7.jpg",
    ]
    assert all(r["error"] == "unsafe tar member: absolute or '..' path, not read" for r in bad)
    assert rows["sa_5"]["status"] == "ok"
    assert not (tmp_path / "sa_6.jpg").exists()
    assert "2  unsafe tar member" in capsys.readouterr().out


def test_incomplete_pairs_and_member_order(tmp_path, sa_members, make_tar, sa_photos):
    m = dict(sa_members([1, 2, 3, 4]))
    members = [
        ("sa_2.jpg", m["sa_2.jpg"]),  # pairs interleaved: matched by key, not adjacency
        ("sa_1.jpg", m["sa_1.jpg"]),
        ("sa_2.json", m["sa_2.json"]),
        ("sa_1.json", m["sa_1.json"]),
        ("sa_3.jpg", m["sa_3.jpg"]),  # no json
        ("sa_4.json", m["sa_4.json"]),  # no jpg
        ("sa_5.jpg", sa_photos[0]),
        ("sa_5.json", b'{"image": {"image_id": 5'),  # malformed
        ("README.md", b"hello"),
    ]
    tar = make_tar(tmp_path / "sa_000000.tar", members)
    store = Store(str(tmp_path / "s"))
    s = ingest(store, sam_samples([str(tar)]), "sam", IngestConfig(), progress=False)
    rows = meta_rows(tmp_path / "s")
    # complete pairs as they complete, then the unpaired members of the tar
    assert store.ok_keys("000000") == ["sa_2", "sa_1", "sa_5", "sa_3"]
    assert rows["sa_1"]["n_masks"] == 2 and rows["sa_2"]["n_masks"] == 3
    assert rows["sa_3"]["n_masks"] is None and rows["sa_3"]["image_id"] == 3
    assert json.loads(rows["sa_3"]["source_meta"])["annotation_problem"] == "no annotation json"
    assert (
        rows["sa_4"]["status"] == "error"
        and rows["sa_4"]["error"] == "missing image: annotation json without a jpg"
    )
    assert rows["sa_4"]["n_masks"] == 4 % 7 + 1
    assert json.loads(rows["sa_5"]["source_meta"])["annotation_problem"].startswith(
        "malformed annotation json"
    )
    other = [r for r in rows.values() if r["path"] == "sa_000000.tar:README.md"]
    assert other[0]["error"] == "unexpected tar member: not sa_<id>.jpg or sa_<id>.json"
    assert dict(s.errors) == {"missing image": 1, "unexpected tar member": 1}


def test_a_tar_cut_short_keeps_what_it_held(tmp_path, sa_members, make_tar):
    whole = make_tar(tmp_path / "w.tar", sa_members([1, 2, 3])).read_bytes()
    with tarfile.open(tmp_path / "w.tar") as tar:
        last = tar.getmembers()[-2]  # sa_3.jpg
    (tmp_path / "sa_000000.tar").write_bytes(whole[: last.offset_data + last.size // 2])
    store = Store(str(tmp_path / "s"))
    s = ingest(
        store, sam_samples([str(tmp_path / "sa_000000.tar")]), "sam", IngestConfig(), progress=False
    )
    assert store.ok_keys("000000") == ["sa_1", "sa_2"]
    # sa_3.jpg is cut (its own error row) and the rest of the tar is lost (one row for the tar)
    assert s.ok == 2 and dict(s.errors) == {"truncated tar member": 1, "unreadable tar": 1}
    assert meta_rows(tmp_path / "s")["sa_3"]["error"].startswith("truncated tar member")


def test_reingest_adds_nothing_and_a_new_tar_goes_to_a_new_shard(
    tmp_path, sa_members, make_tar, capsys
):
    src = tmp_path / "tars"
    src.mkdir()
    make_tar(src / "sa_000000.tar", sa_members([1, 2]))
    assert ingest_cli(src, "--store", tmp_path / "s") == 0
    assert ingest_cli(src, "--store", tmp_path / "s") == 0
    assert "nothing new" in capsys.readouterr().out
    make_tar(src / "sa_000001.tar", sa_members([3]))
    assert ingest_cli(src, "--store", tmp_path / "s") == 0
    store = Store(str(tmp_path / "s"))
    assert [store.ok_keys(s) for s in store.shards()] == [["sa_1", "sa_2"], ["sa_3"]]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.tar", None, "no such file or folder"),
        ("links.txt", b"file_name\tcdn_link", "not an SA-1B tar"),
        ("bad.tar", b"\1" * 100, "not a tar file"),
    ],
)
def test_wrong_source_is_a_one_line_error(tmp_path, capsys, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    assert ingest_cli(tmp_path / name, "--store", tmp_path / "s") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "value, key",
    [
        ("sa_1", "sa_1"),
        ("sa_0012.jpg", "sa_12"),
        ("a/b/sa_5.txt", "sa_5"),
        ("a\\sa_7.txt", "sa_7"),
        ("12", "sa_12"),
        (12, "sa_12"),
        ("foo_3", None),
        ("sa_x", None),
        ("", None),
        (None, None),
    ],
)
def test_sa_key_and_the_table_pattern_agree(value, key):
    assert sa_key(value) == key
    if value is not None and not isinstance(value, int):
        s = pl.Series([value], dtype=pl.String).str.replace_all("\\", "/", literal=True)
        digits = s.str.extract(_ID_PATTERN, 1).cast(pl.Int64, strict=False)[0]
        assert (None if digits is None else f"sa_{digits}") == key


def test_extracted_copy_of_the_shipped_annotation(tmp_path, sa_photos):
    """The real synthetic SA-1B annotation files from tests/data are read as they are."""
    from pathlib import Path

    data = Path(__file__).parent.parent / "data" / "sa1b"
    for i, name in (
        (1, "synthetic_annotation_a.json"),
        (2, "synthetic_annotation_b_empty_mask.json"),
    ):
        shutil.copy(data / name, tmp_path / f"sa_{i}.json")
        (tmp_path / f"sa_{i}.jpg").write_bytes(sa_photos[i])
    samples = list(sam_samples([str(tmp_path)]))
    assert [(s.key, s.n_masks, s.source_meta["file_name"]) for s in samples] == [
        ("sa_1", 1, "a.jpg"),
        ("sa_2", 1, "b.jpg"),
    ]
    assert all("annotation_problem" not in s.source_meta for s in samples)
