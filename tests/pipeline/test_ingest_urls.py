import csv
import json
import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.ingest.folder import SourceError
from pipeline.ingest.urls import read_url_list
from pipeline.store import Store


def _meta(store_dir):
    return {r["url"]: r for r in pq.read_table(str(store_dir / "meta")).to_pylist()}


def test_urls_downloads_with_img2dataset_and_records_every_failure(
    http_server, no_proxy, tmp_path, capsys
):
    base, _ = http_server
    rows = [
        (f"{base}/photos/astronaut.jpg", "an astronaut"),
        (f"{base}/photos/chelsea.png", "a cat"),
        (f"{base}/photos/exif_Landscape_6.jpg", ""),
        (f"{base}/photos/sam_dog.jpg", "a dog"),
        (f"{base}/missing.jpg", "gone"),  # 404
        (f"{base}/notes.jpg", "text"),  # downloads fine, is not an image
        ("http://127.0.0.1:9/refused.jpg", "no server"),  # connection refused
    ]
    lst = tmp_path / "list.csv"
    with open(lst, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["URL", "TEXT", "other"])
        w.writerows([(u, c, i) for i, (u, c) in enumerate(rows)])
    store_dir = tmp_path / "store"
    args = ["ingest", "urls", str(lst), "--store", str(store_dir), "--no-progress"]
    args += ["--url-col", "URL", "--caption-col", "TEXT", "--max-side", "256", "--timeout", "5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ingest urls: 7 new samples in 1 shard(s) (4 ok, 3 errors)" in out
    assert "failed_to_download" in out and "not an image" in out

    meta = _meta(store_dir)
    assert len(meta) == 7 and len({r["key"] for r in meta.values()}) == 7
    ok = {u: r for u, r in meta.items() if r["status"] == "ok"}
    assert set(ok) == {u for u, _ in rows[:4]}
    astro = ok[f"{base}/photos/astronaut.jpg"]
    assert astro["alt_text"] == "an astronaut" and (astro["width"], astro["height"]) == (256, 256)
    assert ok[f"{base}/photos/exif_Landscape_6.jpg"]["alt_text"] is None
    # Original bytes reached our decode: EXIF orientation applied (stored 1200x1800, shown 1800x1200).
    landscape = ok[f"{base}/photos/exif_Landscape_6.jpg"]
    assert (landscape["orig_width"], landscape["orig_height"]) == (1800, 1200)
    assert json.loads(astro["source_meta"])["img2dataset_status"] == "success"

    missing = meta[f"{base}/missing.jpg"]
    assert missing["status"] == "error"
    assert missing["error"].startswith("failed_to_download: HTTP Error 404")
    assert json.loads(missing["source_meta"])["img2dataset_status"] == "failed_to_download"
    assert missing["alt_text"] == "gone"
    refused = meta["http://127.0.0.1:9/refused.jpg"]
    assert refused["error"].startswith("failed_to_download:") and "refused" in refused["error"]
    assert meta[f"{base}/notes.jpg"]["error"].startswith("not an image")

    # The download stays in the store for inspection; bookkeeping names start with '_'.
    (dl,) = (store_dir / "_downloads").iterdir()
    assert (dl / "00000.parquet").exists() and (dl / "00000.tar").exists()
    status = Store(str(store_dir)).status("ingest", "000000")
    assert status["errors_by_reason"] == {
        "failed_to_download": 2,
        "not an image (unidentified format)": 1,
    }

    # Re-running the same list adds nothing (and does not download again).
    assert main(args) == 0
    assert "nothing new" in capsys.readouterr().out
    assert Store(str(store_dir)).shards() == ["000000"]

    # The 404 works later: --retry-errors downloads the failed URLs' shard again and replaces
    # their error rows; what still fails stays one error row per URL.
    root = http_server[1]
    shutil.copy(root / "photos" / "sam_dog.jpg", root / "missing.jpg")
    try:
        assert main([*args, "--retry-errors"]) == 0
    finally:
        (root / "missing.jpg").unlink()
    out = capsys.readouterr().out
    assert "retried 3 earlier error row(s)" in out and "(1 ok, 2 errors)" in out
    meta = _meta(store_dir)
    assert len(meta) == 7 and len({r["key"] for r in meta.values()}) == 7
    assert meta[f"{base}/missing.jpg"]["status"] == "ok"
    st = Store(str(store_dir))
    assert [st.status("ingest", s)["errors"] for s in st.shards()] == [0, 2]  # old rows dropped


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet", "txt"])
def test_url_list_formats_and_default_caption_column(tmp_path, fmt):
    urls = ["http://a.example/1.jpg", "http://a.example/2.jpg"]
    path = tmp_path / f"list.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.table({"url": urls, "caption": ["one", "two"]}), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"url": u, "caption": "c"}) + "\n" for u in urls))
    elif fmt == "txt":
        path.write_text("\n".join(urls) + "\n")
    else:
        sep = "\t" if fmt == "tsv" else ","
        path.write_text(f"url{sep}caption\n" + "".join(f"{u}{sep}c\n" for u in urls))
    lst = read_url_list(str(path))
    assert lst.input_format == fmt and lst.rows == 2 and lst.url_col == "url"
    assert lst.caption_col == (None if fmt == "txt" else "caption")


def test_url_list_without_caption_column(tmp_path):
    path = tmp_path / "l.csv"
    path.write_text("url\nhttp://a.example/1.jpg\n")
    assert read_url_list(str(path)).caption_col is None
    with pytest.raises(SourceError, match="no caption column 'text'"):
        read_url_list(str(path), caption_col="text")


@pytest.mark.parametrize(
    "name, content, extra, message",
    [
        ("missing.csv", None, [], "no such URL list"),
        ("list.xlsx", "url\n", [], "unknown URL list format '.xlsx'"),
        (
            "list.csv",
            "link\nhttp://x/1.jpg\n",
            [],
            "no URL column 'url' \\(columns: link\\); use --url-col",
        ),
        ("list.parquet", "not parquet", [], "not a readable parquet file"),
        (
            "list.csv",
            "url\nhttp://x/1.jpg\n",
            ["--download-threads", "0"],
            "--download-threads must be >= 1",
        ),
    ],
)
def test_bad_url_list_is_one_line(tmp_path, capsys, name, content, extra, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    args = ["ingest", "urls", str(path), "--store", str(tmp_path / "s"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert re.search(message, err), err
