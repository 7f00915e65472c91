"""Named views over the joined meta/scores/captions tables: the PixArt stage expressions, errors
that list the columns, the stored record, and the CLI."""

import json

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from skimage import data

from pipeline import fs
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.ingest.folder import folder_samples
from pipeline.ingest.writer import IngestConfig, ingest
from pipeline.store import Store, StoreError
from pipeline.views import (
    create_view,
    drop_view,
    joined_table,
    list_views,
    read_view,
    view_info,
    view_keys,
)

# name -> (size, clip_aesthetic, duplicate of); files sort in this order, 2 per shard.
PHOTOS = {
    "a_astronaut": ((1200, 1100), 6.5, None),
    "b_chelsea": ((2048, 1024), 5.0, None),
    "c_coffee": ((640, 480), 7.0, None),
    "d_rocket": ((1024, 1536), 6.0, "a_astronaut"),
    "e_camera": ((512, 512), 5.8, None),
    "f_coins": ((1100, 1050), 6.2, None),
}


def write_stage(store: Store, stage: str, shard: str, rows: list[dict]) -> None:
    """A stage output shard following the stage contract: Parquet, then the status record."""
    table = pa.Table.from_pylist(rows)
    checksum = fs.write_parquet(store.url(stage, f"{shard}.parquet"), table)
    errors = sum(r.get("error") is not None for r in rows)
    store.write_status(
        stage,
        shard,
        {
            "rows": len(rows),
            "ok": len(rows) - errors,
            "errors": errors,
            "checksum": checksum,
            "output": f"{shard}.parquet",
        },
    )


def names_by_key(store: Store) -> dict[str, str]:
    meta = pl.read_parquet(store.url("meta", "*.parquet"))
    return {k: p.split(".")[0] for k, p in zip(meta["key"], meta["path"], strict=True)}


@pytest.fixture(scope="module")
def scored_store(tmp_path_factory):
    """Six real photos at chosen sizes, fabricated scores/clip, scores/dedup and captions."""
    src = tmp_path_factory.mktemp("sized")
    for name, (size, _, _) in PHOTOS.items():
        arr = getattr(data, name.split("_", 1)[1])()
        Image.fromarray(arr).convert("RGB").resize(size).save(src / f"{name}.jpg", quality=80)
    store = Store(str(tmp_path_factory.mktemp("views") / "store"))
    ingest(store, folder_samples(str(src)), "folder", IngestConfig(shard_size=2), progress=False)
    key_of = {v: k for k, v in names_by_key(store).items()}
    for shard in store.shards():
        keys = store.ok_keys(shard)
        names = [names_by_key(store)[k] for k in keys]
        write_stage(
            store,
            "scores/clip",
            shard,
            [
                {
                    "key": k,
                    "error": None,
                    "clip_aesthetic": PHOTOS[n][1],
                    "clip_text_sim": 0.25,
                    "width": 1,  # meta's width wins over a score table's
                    "sharpness": 10.0,
                }
                for k, n in zip(keys, names, strict=True)
            ],
        )
        write_stage(
            store,
            "scores/dedup",
            shard,
            [
                {
                    "key": k,
                    "dup_of": key_of[PHOTOS[n][2]] if PHOTOS[n][2] else None,
                    "dup_kind": "semantic" if PHOTOS[n][2] else None,
                    "dup_score": 0.97 if PHOTOS[n][2] else None,
                    "error": None,
                }
                for k, n in zip(keys, names, strict=True)
            ],
        )
        write_stage(
            store,
            "captions/tiny",
            shard,
            [
                {"key": k, "caption": f"a photo of {n.split('_')[1]}", "error": None}
                for k, n in zip(keys, names, strict=True)
            ],
        )
    store.refresh_manifest()
    return store


def selected_names(store: Store, view: str) -> list[str]:
    names = names_by_key(store)
    return [names[k] for k in read_view(store, view)["key"].to_pylist()]


def test_joined_table_has_meta_scores_dedup_and_caption(scored_store):
    df = joined_table(scored_store)
    assert df.height == 6
    for col in ("key", "shard", "width", "height", "clip_aesthetic", "dup_of", "caption"):
        assert col in df.columns
    assert sorted(df["width"].to_list()) == sorted(s[0][0] for s in PHOTOS.values())  # meta wins
    assert df["shard"].to_list() == ["000000", "000000", "000001", "000001", "000002", "000002"]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (
            "clip_aesthetic > 5.5 and width >= 512",
            ["a_astronaut", "c_coffee", "d_rocket", "e_camera", "f_coins"],
        ),
        (
            "clip_aesthetic >= 6 and min(width, height) >= 1024 and dup_of is null",
            ["a_astronaut", "f_coins"],
        ),
        ("max(width, height) >= 2048 or caption like '%coffee%'", ["b_chelsea", "c_coffee"]),
        (
            "source = 'folder' and caption is not null and dup_of is null and label is null",
            ["a_astronaut", "b_chelsea", "c_coffee", "e_camera", "f_coins"],
        ),
    ],
)
def test_view_selects_the_expected_keys(scored_store, where, expected):
    info = create_view(scored_store, "v", where, replace=True)
    assert selected_names(scored_store, "v") == expected
    assert info["selected"] == len(expected) and info["candidates"] == 6
    assert info["captions"] == "tiny" and info["scores"] == ["clip", "dedup"]


def test_view_file_reads_without_alphaset(scored_store):
    create_view(
        scored_store,
        "stage3",
        "clip_aesthetic >= 6 and min(width, height) >= 1024 and dup_of is null",
        replace=True,
    )
    path = scored_store.url("views", "stage3.parquet")
    record = json.loads(pq.read_schema(path).metadata[b"alphaset.view"])
    assert record["where"].startswith("clip_aesthetic >= 6") and record["selected"] == 2
    assert record["selected_by_shard"] == {"000000": 1, "000002": 1}
    assert pl.read_parquet(path).columns == ["key", "shard"]
    keys = view_keys(scored_store, "stage3")
    assert list(keys) == ["000000", "000002"] and all(len(v) == 1 for v in keys.values())
    assert view_info(scored_store, "stage3")["name"] == "stage3"


def test_unknown_column_lists_columns(scored_store):
    with pytest.raises(
        ValueError, match=r"unknown column 'aesthetic'.*columns: .*clip_aesthetic.*dup_of"
    ):
        create_view(scored_store, "bad", "aesthetic > 5", replace=True)


@pytest.mark.parametrize(
    "where", ["clip_aesthetic >", "width", "width > 1; drop table x", "width > 'abc'"]
)
def test_bad_expression_is_one_line_listing_columns(scored_store, where):
    with pytest.raises(UserError, match=r"bad --where expression .*columns: key, shard") as e:
        create_view(scored_store, "bad", where, replace=True)
    assert "\n" not in str(e.value)


def test_two_score_tags_with_the_same_column_ask_for_a_choice(scored_store, tmp_path):
    store = Store(str(tmp_path / "copy"))
    fs_copy(scored_store.root, store.root)
    for shard in store.shards():
        keys = store.ok_keys(shard)
        write_stage(
            store,
            "scores/other",
            shard,
            [{"key": k, "clip_aesthetic": 1.0, "error": None} for k in keys],
        )
    with pytest.raises(
        StoreError, match=r"'clip_aesthetic' is in both scores/clip and scores/other.*--scores"
    ):
        joined_table(store)
    df = joined_table(store, scores=["other", "dedup"])
    assert df["clip_aesthetic"].to_list() == [1.0] * 6 and "dup_of" in df.columns


def test_stage_missing_on_a_shard_is_recorded(scored_store, tmp_path):
    store = Store(str(tmp_path / "partial"))
    fs_copy(scored_store.root, store.root)
    fs.remove(store.status_url("scores/clip", "000002"))
    info = create_view(store, "v", "clip_aesthetic > 0", replace=True)
    assert info["incomplete_stages"] == {"scores/clip": 1}
    assert info["selected"] == 4 and "000002" not in view_keys(store, "v")


def fs_copy(src: str, dst: str) -> None:
    import shutil

    shutil.copytree(src, dst)


def test_missing_view_and_duplicate_name(scored_store):
    with pytest.raises(StoreError, match=r"no view 'nope'"):
        read_view(scored_store, "nope")
    create_view(scored_store, "dup", "width > 0", replace=True)
    with pytest.raises(StoreError, match="already exists"):
        create_view(scored_store, "dup", "width > 0")
    drop_view(scored_store, "dup")
    assert "dup" not in [v["name"] for v in list_views(scored_store)]
    with pytest.raises(UserError, match="bad view name"):
        create_view(scored_store, "../x", "width > 0")


def test_view_cli(scored_store, capsys):
    root = scored_store.root
    assert (
        main(
            [
                "manifest",
                "view",
                "create",
                "s1",
                "--where",
                "clip_aesthetic > 5.5 and width >= 512",
                "--store",
                root,
                "--replace",
            ]
        )
        == 0
    )
    assert "5 of 6" in capsys.readouterr().out
    assert main(["manifest", "view", "list", "--store", root]) == 0
    assert "s1" in capsys.readouterr().out
    assert main(["manifest", "view", "show", "s1", "--store", root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selected"] == 5
    assert main(["manifest", "view", "create", "s2", "--where", "nope > 1", "--store", root]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "columns: key, shard" in err
    assert main(["manifest", "view", "drop", "s1", "--store", root]) == 0
    assert main(["manifest", "view", "show", "s1", "--store", root]) == 2
