import json

import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.ingest.folder import SourceError
from pipeline.ingest.wds import expand_tars, wds_samples
from pipeline.ingest.writer import IngestConfig, ingest
from pipeline.store import Store


@pytest.fixture(scope="module")
def wds_dir(tmp_path_factory, photos_dir, make_tar):
    """Two img2dataset-style tars: <key>.jpg + <key>.txt + <key>.json (url, caption)."""
    out = tmp_path_factory.mktemp("wds")
    photos = sorted(photos_dir.iterdir())
    for t in range(2):
        members = []
        for i, p in enumerate(photos[t * 3 : t * 3 + 3]):
            key = f"{t:04d}{i:05d}"
            ext = "jpg" if p.suffix == ".jpg" else "png"
            meta = {"url": f"http://example.com/{p.name}", "caption": f"json caption {p.stem}"}
            members.append((f"{key}.{ext}", p.read_bytes()))
            if i != 1:  # sample 1 has no .txt: the json caption is used
                members.append((f"{key}.txt", f"a photo of {p.stem}".encode()))
            members.append((f"{key}.json", json.dumps(meta).encode()))
        make_tar(out / f"{t:05d}.tar", members)
    return out


def test_wds_brace_pattern_carries_captions_and_json(wds_dir, tmp_path, capsys):
    store_dir = tmp_path / "s"
    pattern = str(wds_dir / "{00000..00001}.tar")
    args = [
        "ingest",
        "wds",
        pattern,
        "--store",
        str(store_dir),
        "--no-progress",
        "--max-side",
        "128",
    ]
    assert main(args) == 0
    assert "6 new samples in 1 shard(s) (6 ok, 0 errors)" in capsys.readouterr().out
    rows = pq.read_table(str(store_dir / "meta")).to_pylist()
    assert [r["path"] for r in rows[:2]] == ["00000.tar/000000000.jpg", "00000.tar/000000001.png"]
    assert rows[0]["alt_text"].startswith("a photo of ")
    assert rows[1]["alt_text"].startswith("json caption ")  # no .txt: caption from the json
    assert all(r["url"].startswith("http://example.com/") for r in rows)
    assert json.loads(rows[0]["source_meta"])["url"] == rows[0]["url"]
    assert all(max(r["width"], r["height"]) <= 128 for r in rows)
    # The store's own tar carries the caption as <key>.txt for webdataset readers.
    files = dict(next(iter(_store_samples(store_dir))))
    assert files["txt"].startswith(b"a photo of ")

    # A single tar and the folder name the same samples: nothing new.
    assert main(["ingest", "wds", str(wds_dir / "00000.tar"), "--store", str(store_dir)]) == 0
    assert main(["ingest", "wds", str(wds_dir), "--store", str(store_dir), "--no-progress"]) == 0
    assert "nothing new" in capsys.readouterr().out
    assert Store(str(store_dir)).shards() == ["000000"]


def _store_samples(store_dir):
    from pipeline.store import iter_tar_samples

    for _, files in iter_tar_samples(str(store_dir / "images" / "000000.tar")):
        yield files.items()


def test_wds_folder_and_pattern_resolve_to_sorted_absolute_tars(wds_dir):
    by_folder = expand_tars(str(wds_dir))
    assert by_folder == expand_tars(str(wds_dir / "{00000..00001}.tar"))
    assert [p.rsplit("/", 1)[-1] for p in by_folder] == ["00000.tar", "00001.tar"]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{00000..00003}.tar", "no such tar: .*00002.tar \\(and 1 more of 4\\)"),
        ("empty", "no .tar files in folder"),
    ],
)
def test_wrong_wds_source_is_one_line(wds_dir, tmp_path, spec, message, capsys):
    (tmp_path / "empty").mkdir()
    base = tmp_path / "empty" if spec == "empty" else wds_dir / spec
    with pytest.raises(SourceError, match=message):
        wds_samples(str(base))
    assert main(["ingest", "wds", str(base), "--store", str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_sample_without_image_and_broken_sidecar(tmp_path, make_tar, photos_dir, capsys):
    jpg = (photos_dir / "astronaut.jpg").read_bytes()
    tar = make_tar(
        tmp_path / "a.tar",
        [
            ("x/0001.jpg", jpg),
            ("x/0001.json", b"{not json"),
            ("x/0002.txt", b"caption without an image"),
            ("x/0002.json", b"{}"),
        ],
    )
    store = Store(str(tmp_path / "s"))
    s = ingest(store, wds_samples(str(tar)), "wds", IngestConfig(), progress=False)
    rows = {r["path"]: r for r in store.read_meta("000000").to_pylist()}
    ok = rows["a.tar/x/0001.jpg"]
    assert ok["status"] == "ok"
    assert "malformed json sidecar" in json.loads(ok["source_meta"])["sidecar_problem"]
    bad = rows["a.tar/x/0002"]
    assert bad["error"].startswith("no image in sample")
    assert json.loads(bad["source_meta"])["members"] == ["json", "txt"]
    assert bad["alt_text"] == "caption without an image"
    assert s.ok == 1 and dict(s.errors) == {
        "no image in sample (expected jpg, jpeg, png or webp)": 1
    }
    assert dict(s.notes) == {"malformed json sidecar": 1}
    assert any("note" in line and "malformed json sidecar" in line for line in s.lines())


def test_corrupt_tar_keeps_earlier_samples_and_counts_the_tar(tmp_path, make_tar, photos_dir):
    jpg = (photos_dir / "astronaut.jpg").read_bytes()
    png = (photos_dir / "chelsea.png").read_bytes()
    good = make_tar(tmp_path / "full.tar", [("0001.jpg", jpg), ("0002.png", png)]).read_bytes()
    # Cut inside the second member's data: tarfile raises when it runs out of bytes.
    second_data = 512 + -(-len(jpg) // 512) * 512 + 512
    (tmp_path / "cut.tar").write_bytes(good[: second_data + 700])
    (tmp_path / "zzz.tar").write_bytes(b"this is not a tar archive at all" * 40)
    store = Store(str(tmp_path / "s"))
    s = ingest(
        store, wds_samples(str(tmp_path / "{cut,zzz}.tar")), "wds", IngestConfig(), progress=False
    )
    rows = store.read_meta("000000").to_pylist()
    assert [r["path"] for r in rows if r["status"] == "ok"] == ["cut.tar/0001.jpg"]
    errors = [r["error"] for r in rows if r["status"] == "error"]
    assert len(errors) == 2 and all(e.startswith("unreadable tar: ") for e in errors)
    assert s.errors == {"unreadable tar": 2}
