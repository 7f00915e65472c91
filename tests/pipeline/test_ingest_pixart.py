import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.ingest.folder import SourceError
from pipeline.ingest.pixart import pixart_samples
from pipeline.ingest.writer import IngestConfig, ingest
from pipeline.store import Store

INFO = Path(__file__).parent.parent / "data" / "pixart_data_info"


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    """Real photos under the first three paths the real data_info files name (as webp)."""
    root = tmp_path_factory.mktemp("InternImgs")
    entries = json.loads((INFO / "SebastianHeid_data_info_stable_loss.json").read_text())
    photos = ["sam_dog.jpg", "rembg_girl-1.jpg", "sam_groceries.jpg"]
    for entry, photo in zip(entries[:3], photos, strict=True):
        Image.open(INFO.parent / "photos" / photo).save(root / entry["path"], quality=90)
    return root


@pytest.mark.parametrize(
    "name", ["SebastianHeid_data_info_fixed.json", "SebastianHeid_data_info_ration_typo.json"]
)
def test_prompt_kept_and_ration_typo_tolerated(image_root, tmp_path, name):
    store = Store(str(tmp_path / "s"))
    s = ingest(
        store,
        pixart_samples(str(INFO / name), str(image_root)),
        "pixart",
        IngestConfig(),
        progress=False,
    )
    assert s.ok == 1 and not s.errors
    (row,) = store.read_meta("000000").to_pylist()
    assert row["path"] == "000000000.webp" and row["source"] == "pixart"
    assert row["alt_text"].startswith("digital painting, cozy winter village scene")
    meta = json.loads(row["source_meta"])
    assert meta["ratio"] == 1.0 and meta["width"] == 850  # the declared size is kept as given
    assert (row["width"], row["height"]) == (800, 534)  # the stored size is the real one


def test_missing_files_are_error_rows(image_root, tmp_path, capsys):
    src = INFO / "SebastianHeid_data_info_stable_loss.json"
    args = ["ingest", "pixart", str(src), "--root", str(image_root), "--store", str(tmp_path / "s")]
    assert main([*args, "--no-progress", "--shard-size", "40"]) == 0
    out = capsys.readouterr().out
    assert "100 new samples in 3 shard(s) (3 ok, 97 errors)" in out
    assert "error       97  missing file" in out
    store = Store(str(tmp_path / "s"))
    rows = [r for sh in store.shards() for r in store.read_meta(sh).to_pylist()]
    assert [r["path"] for r in rows if r["status"] == "ok"] == [
        "000000000.webp",
        "000000024.webp",
        "000000040.webp",
    ]
    missing = next(r for r in rows if r["path"] == "000000049.webp")
    assert missing["error"] == "missing file" and missing["alt_text"]
    # Both spellings are kept as found; this file's `ratio` disagrees with its `ration`.
    meta = json.loads(next(r for r in rows if r["path"] == "000000024.webp")["source_meta"])
    assert meta["ration"] == 0.774 and meta["ratio"] == 1.0
    assert main([*args, "--no-progress"]) == 0
    assert "nothing new" in capsys.readouterr().out


def test_malformed_and_unsafe_entries(image_root, tmp_path):
    info = tmp_path / "data_info.json"
    outside = tmp_path / "outside.jpg"
    shutil.copy(INFO.parent / "photos" / "sam_dog.jpg", outside)
    entries = [
        {"path": "000000000.webp", "prompt": "ok", "ration": 0.5},
        {"prompt": "no path"},
        "not an object",
        {"path": "../outside.jpg", "prompt": "escapes the root"},
        {"path": str(outside), "prompt": "absolute"},
    ]
    info.write_text(json.dumps(entries))
    store = Store(str(tmp_path / "s"))
    s = ingest(
        store, pixart_samples(str(info), str(image_root)), "pixart", IngestConfig(), progress=False
    )
    rows = store.read_meta("000000").to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "error", "error", "error"]
    assert json.loads(rows[0]["source_meta"]) == {
        "ration": 0.5,
        "ratio": 0.5,
        "sidecar_problem": "ratio mismatch: data_info 0.5, image h/w 0.667 (800x534)",
    }
    assert rows[1]["error"] == rows[2]["error"] == "malformed entry: no 'path' string"
    assert rows[3]["error"].startswith("unsafe path") and rows[4]["error"].startswith("unsafe path")
    assert s.errors == {"malformed entry": 2, "unsafe path": 2}


@pytest.mark.parametrize(
    "content, root, message",
    [
        (None, True, "no such data_info file"),
        ("{not json", True, "not valid JSON"),
        ('{"path": "a.jpg"}', True, "expected a JSON list of entries, got dict"),
        ("[]", False, "no such image root folder"),
    ],
)
def test_bad_data_info_is_one_line(tmp_path, capsys, content, root, message):
    info = tmp_path / "data_info.json"
    if content is not None:
        info.write_text(content)
    root_dir = tmp_path if root else tmp_path / "nope"
    with pytest.raises(SourceError, match=message):
        pixart_samples(str(info), str(root_dir))
    args = ["ingest", "pixart", str(info), "--root", str(root_dir), "--store", str(tmp_path / "s")]
    assert main(args) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_caption_field_and_ratio_checks(tmp_path, capsys):
    """PixArt-Σ's sharegpt4v field as the caption; ratios above PixArt-α's 4 and ratios that
    disagree with the image are kept but counted in the summary."""
    root = tmp_path / "imgs"
    root.mkdir()
    truck = Image.open(INFO.parent / "photos" / "sam_truck.jpg")  # 1800x1200
    truck.save(root / "wide.jpg")
    truck.crop((0, 0, 250, 1200)).save(root / "tall.jpg")  # h/w 4.8: PixArt-α drops it
    truck.crop((0, 0, 600, 1200)).save(root / "two.jpg")  # h/w 2.0
    entries = [
        {"path": "wide.jpg", "prompt": "a truck", "sharegpt4v": "A long caption of a truck.",
         "height": 1200, "width": 1800, "ratio": 0.667},
        {"path": "tall.jpg", "prompt": "a strip", "sharegpt4v": "A tall strip.", "ratio": 4.8},
        {"path": "two.jpg", "prompt": "no long caption", "ratio": 1.0},
    ]  # fmt: skip
    info = tmp_path / "data_info.json"
    info.write_text(json.dumps(entries))
    store = tmp_path / "s"
    args = ["ingest", "pixart", str(info), "--root", str(root), "--store", str(store)]
    assert main([*args, "--caption-field", "sharegpt4v", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "(3 ok, 0 errors)" in out
    assert "note         1  ratio above PixArt-α's limit of 4 (its loader drops the row)" in out
    assert "note         1  ratio mismatch (image kept)" in out
    rows = Store(str(store)).read_meta("000000").to_pylist()
    assert [r["alt_text"] for r in rows] == ["A long caption of a truck.", "A tall strip.", None]
    wide, tall, two = (json.loads(r["source_meta"]) for r in rows)
    assert wide["prompt"] == "a truck" and "sidecar_problem" not in wide  # 0.667 ≈ 1200/1800
    assert tall["sidecar_problem"].startswith("ratio above PixArt-α's limit of 4")
    assert two["sidecar_problem"] == (
        "ratio mismatch: data_info 1.0, image h/w 2.000 (600x1200); no 'sharegpt4v' caption"
    )
    status = Store(str(store)).status("ingest", "000000")
    assert status["settings"]["caption_field"] == "sharegpt4v"
    with pytest.raises(SourceError, match="--caption-field must be one of prompt, sharegpt4v"):
        pixart_samples(str(info), str(root), caption_field="caption")
