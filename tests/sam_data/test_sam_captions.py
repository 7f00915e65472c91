import io
import json
import tarfile

import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.ingest.writer import IngestConfig, ingest
from pipeline.store import Store, StoreError, sha256_url
from sam_data.captions import CAPTION_SCHEMA, import_captions
from sam_data.ingest import sam_samples

CAPTIONS = {i: f"A dense caption of SA-1B image {i}, with details." for i in (1, 2, 4, 5, 99)}


@pytest.fixture
def sa_store(tmp_path, sa_members, make_tar) -> Store:
    """Images sa_1..sa_5 in shards of 2: [sa_1, sa_2], [sa_3, sa_4], [sa_5]."""
    tar = make_tar(tmp_path / "sa_000000.tar", sa_members([1, 2, 3, 4, 5]))
    store = Store(str(tmp_path / "store"))
    ingest(store, sam_samples([str(tar)]), "sam", IngestConfig(shard_size=2), progress=False)
    return store


def caption_folder(root, ids=CAPTIONS) -> str:
    """PixArt's SAM-LLaVA-Captions10M layout: one sa_<id>.txt per image (here in a subfolder)."""
    (root / "SA1B_caption").mkdir(parents=True)
    for i in ids:
        (root / "SA1B_caption" / f"sa_{i}.txt").write_text(CAPTIONS[i] + "\n")
    (root / "SA1B_caption" / "README.txt").write_text("not a caption")
    return str(root)


def read_tag(store: Store, tag: str = "sam-llava") -> pl.DataFrame:
    return pl.read_parquet(f"{store.root}/captions/{tag}/*.parquet")


def test_folder_import_writes_shard_aligned_captions(tmp_path, sa_store):
    res = import_captions(sa_store, caption_folder(tmp_path / "caps"), progress=False)
    for shard in sa_store.shards():
        url = f"{sa_store.root}/captions/sam-llava/{shard}.parquet"
        table = pq.read_table(url)
        assert table.schema.equals(CAPTION_SCHEMA)
        assert table["key"].to_pylist() == sa_store.ok_keys(shard)
        rec = sa_store.status("captions/sam-llava", shard)
        assert rec["checksum"] == sha256_url(url) and rec["rows"] == table.num_rows
    df = read_tag(sa_store)
    ok = df.filter(pl.col("error").is_null())
    assert ok["key"].to_list() == ["sa_1", "sa_2", "sa_4", "sa_5"]
    assert ok["caption"].to_list() == [CAPTIONS[i] for i in (1, 2, 4, 5)]
    assert ok["truncated"].to_list() == [False] * 4 and set(ok["model"]) == {"imported"}
    assert df.filter(pl.col("key") == "sa_3")["error"].to_list() == ["no caption"]
    assert (res.missing, res.missing_examples) == (1, ["sa_3"])
    assert (res.index.orphans, res.index.bad_ids) == (1, 1)
    text = "\n".join(res.lines())
    assert "1 images without a caption (error rows 'no caption'), e.g. sa_3" in text
    assert "1 caption ids without an image in the store, e.g. SA1B_caption/sa_99.txt" in text
    assert "1 entries whose id is not an SA-1B id, e.g. SA1B_caption/README.txt" in text
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert set(manifest["stages"]["captions/sam-llava"]["shards"]) == {"000000", "000001", "000002"}


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_table_import_with_assorted_id_forms(tmp_path, sa_store, fmt):
    ids = ["sa_1.jpg", "2", "sa_4", "images/sa_5.jpg", "sa_99", "sa_1", "foo"]
    caps = [CAPTIONS[1], CAPTIONS[2], CAPTIONS[4], CAPTIONS[5], CAPTIONS[99], "a duplicate", "x"]
    df = pl.DataFrame({"file_name": ids, "text": caps, "other": range(7)})
    path = tmp_path / f"caps.{fmt}"
    {"parquet": df.write_parquet, "jsonl": df.write_ndjson, "csv": df.write_csv}[fmt](path)
    res = import_captions(str(sa_store.root), str(path), tag="llava-sam", progress=False)
    out = read_tag(sa_store, "llava-sam")
    assert dict(zip(out["key"], out["caption"], strict=True)) == {
        "sa_1": CAPTIONS[1],
        "sa_2": CAPTIONS[2],
        "sa_3": None,
        "sa_4": CAPTIONS[4],
        "sa_5": CAPTIONS[5],
    }
    ix = res.index
    assert (ix.entries, ix.orphans, ix.bad_ids, ix.duplicates) == (7, 1, 1, 1)
    assert ix.orphan_examples == ["sa_99"] and ix.bad_examples == ["foo"]


def test_integer_ids_and_named_columns(tmp_path, sa_store, capsys):
    path = tmp_path / "caps.parquet"
    pl.DataFrame({"sam": [1, 3], "llava": ["one", "three"]}).write_parquet(path)
    args = ["sam", "captions", str(path), "--store", sa_store.root, "--no-progress"]
    assert main(args) == 2
    assert "none of the columns sam, llava looks like id column" in capsys.readouterr().err
    assert main([*args, "--id-column", "sam", "--caption-column", "llava"]) == 0
    assert read_tag(sa_store)["caption"].to_list() == ["one", None, "three", None, None]


def test_tar_gz_source_is_streamed(tmp_path, sa_store):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in (5, 1, 99):
            data = CAPTIONS[i].encode()
            info = tarfile.TarInfo(f"SA1B_caption/sa_{i}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "SA1B_caption.tar.gz").write_bytes(buf.getvalue())
    res = import_captions(sa_store, str(tmp_path / "SA1B_caption.tar.gz"), progress=False)
    assert read_tag(sa_store)["caption"].to_list() == [CAPTIONS[1], None, None, None, CAPTIONS[5]]
    assert res.missing == 3 and res.index.orphans == 1


def test_ingest_with_captions_then_a_later_tar_is_captioned_by_the_separate_step(
    tmp_path, sa_members, make_tar, capsys
):
    caps = caption_folder(tmp_path / "caps")
    store_dir = tmp_path / "s"
    t0 = make_tar(tmp_path / "sa_000000.tar", sa_members([1, 2, 3]))
    assert (
        main(
            [
                "ingest",
                "sam",
                str(t0),
                "--store",
                str(store_dir),
                "--captions",
                caps,
                "--no-progress",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "captions/sam-llava: 1 shard(s) done" in out and "e.g. sa_3" in out
    t1 = make_tar(tmp_path / "sa_000001.tar", sa_members([4, 5]))
    assert main(["ingest", "sam", str(t1), "--store", str(store_dir), "--no-progress"]) == 0
    args = [
        "sam",
        "captions",
        caps,
        "--store",
        str(store_dir),
        "--tag",
        "sam-llava",
        "--no-progress",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "1 shard(s) done, 1 skipped as already done" in out
    store = Store(str(store_dir))
    assert read_tag(store)["key"].to_list() == ["sa_1", "sa_2", "sa_3", "sa_4", "sa_5"]
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_other_settings_under_the_same_tag_are_refused(tmp_path, sa_store):
    caps = caption_folder(tmp_path / "caps")
    import_captions(sa_store, caps, progress=False)
    with pytest.raises(StoreError, match="started with other settings \\(model differ\\)"):
        import_captions(sa_store, caps, model="llava-v1.5-13b", progress=False)


def test_bad_captions_path_fails_before_ingesting(tmp_path, sa_members, make_tar, capsys):
    t0 = make_tar(tmp_path / "sa_000000.tar", sa_members([1]))
    rc = main(
        [
            "ingest",
            "sam",
            str(t0),
            "--store",
            str(tmp_path / "s"),
            "--captions",
            str(tmp_path / "nope"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such captions file or folder" in err
    assert not (tmp_path / "s").exists()
    (tmp_path / "caps.xlsx").write_bytes(b"x")
    assert (
        main(["sam", "captions", str(tmp_path / "caps.xlsx"), "--store", str(tmp_path / "s")]) == 2
    )
    assert "expected a folder of sa_<id>.txt" in capsys.readouterr().err


def test_schema_matches_the_captioner():
    """Imported captions and LLaVA captions must be interchangeable tables."""
    worker = pytest.importorskip("captioning.worker")
    assert CAPTION_SCHEMA.equals(worker.CAPTION_SCHEMA)
