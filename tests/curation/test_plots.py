"""`manifest plot`: histograms and contact sheets from real photos and fabricated score tables;
plots whose column is absent are skipped with a reason."""

import pyarrow as pa
import pytest
from PIL import Image

from curation.plots import _wrap, plot_store
from pipeline import fs
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.ingest.folder import ingest_folder
from pipeline.store import Store


def write_stage(store: Store, stage: str, shard: str, rows: list[dict]) -> None:
    checksum = fs.write_parquet(store.url(stage, f"{shard}.parquet"), pa.Table.from_pylist(rows))
    store.write_status(
        stage, shard, {"rows": len(rows), "ok": len(rows), "errors": 0, "checksum": checksum}
    )


@pytest.fixture(scope="module")
def store(photos_dir, tmp_path_factory):
    st = Store(str(tmp_path_factory.mktemp("plots") / "store"))
    ingest_folder(st, str(photos_dir), progress=False, shard_size=3, max_side=160)
    return st


def add_scores_and_captions(store: Store) -> None:
    for i, shard in enumerate(store.shards()):
        keys = store.ok_keys(shard)
        write_stage(
            store,
            "scores/clip",
            shard,
            [
                {
                    "key": k,
                    "error": None,
                    "clip_aesthetic": 3.0 + 3 * i + j,
                    "clip_text_sim": 0.1 * j,
                }
                for j, k in enumerate(keys)
            ],
        )
        write_stage(
            store,
            "captions/tiny",
            shard,
            [
                {
                    "key": k,
                    "caption": f"photo {k[:6]}: a long caption that has to wrap over several lines "
                    * (j + 1),
                    "error": None,
                }
                for j, k in enumerate(keys)
            ],
        )


def test_plots_without_scores_are_skipped_with_a_reason(store, tmp_path):
    info = plot_store(store, str(tmp_path / "p"))
    assert sorted(p.rsplit("/", 1)[1] for p in info["written"]) == ["aspect.png", "resolution.png"]
    assert "alphaset score" in info["skipped"]["aesthetic.png"]
    assert "caption" in info["skipped"]["caption_length.png"]
    assert "top/bottom contact sheets" in info["skipped"]


def test_plots_and_contact_sheets(store, tmp_path, capsys):
    add_scores_and_captions(store)
    out = tmp_path / "plots"
    assert main(["manifest", "plot", "--store", store.root, "--out", str(out), "--n", "4"]) == 0
    printed = capsys.readouterr().out
    names = {
        "aesthetic.png",
        "clip_similarity.png",
        "resolution.png",
        "aspect.png",
        "caption_length.png",
        "top_aesthetic.png",
        "bottom_aesthetic.png",
    }
    assert {p.name for p in out.iterdir()} == names
    assert "skipped" not in printed
    hist = Image.open(out / "aesthetic.png")
    assert hist.format == "PNG" and hist.size == (700, 420)
    sheet = Image.open(out / "top_aesthetic.png").convert("RGB")
    assert sheet.width == 4 * (208 + 16)  # 4 thumbnails in a row
    # thumbnails are real images, not blank cells: the first cell has many distinct colours
    cell = sheet.crop((8, 44, 8 + 208, 44 + 208))
    assert len(set(cell.getdata())) > 500


def test_wrap_limits_lines_and_width():
    img = Image.new("RGB", (10, 10))
    from PIL import ImageDraw, ImageFont

    draw, font = ImageDraw.Draw(img), ImageFont.load_default(size=13)
    lines = _wrap(draw, "word " * 100 + "x" * 80, font, 150, 4)
    assert len(lines) == 4 and lines[-1].endswith("…")
    assert all(draw.textlength(line, font=font) <= 150 for line in lines)
    assert _wrap(draw, "y" * 80, font, 100, 5)[0].startswith("yyy")


def test_bad_n_is_an_error(store, tmp_path):
    with pytest.raises(UserError, match="--n must be >= 1"):
        plot_store(store, str(tmp_path), n=0)
