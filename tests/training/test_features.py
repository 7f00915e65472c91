import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import fs
from pipeline.store import Store, StoreError
from training.features import (
    FeatureSettings,
    FeatureWorker,
    default_tag,
    extract_features,
)
from training.text import clean_caption

STAGE = "features/test"


def worker(store: str, stage: str = STAGE, **settings) -> FeatureWorker:
    """A worker that loads the tiny models itself, as a Ray actor does."""
    settings.setdefault("resolution", 256)
    settings.setdefault("captions", "alt")
    return FeatureWorker(store, stage, t5="tiny", vae="tiny", **settings)


def reuse(loaded: FeatureWorker, store: str, **settings) -> FeatureWorker:
    """A worker with other settings around the models ``loaded`` already holds (saves a load)."""
    settings.setdefault("resolution", 256)
    settings.setdefault("captions", "alt")
    return FeatureWorker.from_models(
        store, STAGE, loaded.text, loaded.vae, FeatureSettings(**settings), "tiny", "tiny"
    )


def read_tar(path: str | Path) -> dict[str, dict[str, object]]:
    """Read a feature shard with tarfile + numpy alone: key → {ext: array | dict}."""
    out: dict[str, dict[str, object]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            data = tar.extractfile(m).read()
            value = (
                json.loads(data) if ext == "json" else np.load(io.BytesIO(data), allow_pickle=False)
            )
            out.setdefault(key, {})[ext] = value
    return out


def all_samples(store: str, stage: str = STAGE) -> dict[str, dict[str, object]]:
    out = {}
    for shard in Store(store).shards():
        out.update(read_tar(Path(store) / stage / f"{shard}.tar"))
    return out


def by_stem(store: str) -> dict[str, str]:
    """Photo file stem → store key."""
    meta = pa.concat_tables([Store(store).read_meta(s) for s in Store(store).shards()])
    return {
        Path(p).stem: k
        for p, k in zip(meta["path"].to_pylist(), meta["key"].to_pylist(), strict=True)
    }


@pytest.fixture(scope="module")
def square_run(feature_store_template, tmp_path_factory):
    """One single-scale 256 px run over a copy of the store, shared by the tests that read it."""
    import shutil

    root = tmp_path_factory.mktemp("square") / "store"
    shutil.copytree(feature_store_template, root)
    w = worker(str(root))
    records = {s: w(s) for s in Store(str(root)).shards()}
    return str(root), w, records


def test_shard_layout_and_dtypes(square_run):
    store, w, records = square_run
    st = Store(store)
    keys = by_stem(store)
    for shard in st.shards():
        got = read_tar(Path(store) / STAGE / f"{shard}.tar")
        assert list(got) == st.ok_keys(shard)  # image-shard order, every ok key
        rec = st.status(STAGE, shard)
        assert rec == records[shard] and rec["output"] == f"{shard}.tar"
        assert rec["checksum"] == _sha(Path(store) / STAGE / f"{shard}.tar")
        assert rec["settings"]["vae_dtype"] == "fp32" and rec["model"]["vae_dtype"] == "float32"
    samples = all_samples(store)
    a = samples[keys["astronaut"]]
    assert a["t5.npy"].dtype == np.float16 and a["t5.npy"].shape == (120, 64)
    assert a["mask.npy"].dtype == np.uint8 and a["mask.npy"].shape == (120,)
    assert a["vae.npy"].dtype == np.float16 and a["vae.npy"].shape == (2, 4, 32, 32)
    assert (a["vae.npy"][1] > 0).all()  # the std half
    n = a["json"]["n_tokens"]
    assert a["mask.npy"].sum() == n and not a["json"]["text_truncated"]
    assert np.abs(a["t5.npy"][:n]).sum() > 0 and not a["t5.npy"][n:].any()  # zero past n_tokens
    assert a["json"] == {
        "key": keys["astronaut"],
        "bucket": [256, 256],
        "resolution": 256,
        "caption": "portrait of an astronaut in an orange suit",
        "text_truncated": False,
        "n_tokens": n,
        "orig_width": 512,
        "orig_height": 512,
        "error": None,
    }
    # The null caption: </s> alone, stored once for the tag.
    null = np.load(Path(store) / STAGE / "_null.npz")
    assert null["t5"].shape == (120, 64) and null["mask"].sum() == 1


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_errors_are_rows_not_crashes(square_run):
    store, _, records = square_run
    samples = all_samples(store)
    bad = samples[by_stem(store)["urlonly"]]
    assert set(bad) == {"json"}  # no arrays for an error row
    assert bad["json"]["error"] == "empty caption after cleaning" and bad["json"]["bucket"] is None
    total = {}
    for rec in records.values():
        for reason, n in rec["errors_by_reason"].items():
            total[reason] = total.get(reason, 0) + n
    assert total == {"empty caption after cleaning": 1}


def test_long_caption_is_truncated_and_flagged(square_run, feature_texts):
    store, w, _ = square_run
    s = all_samples(store)[by_stem(store)["chelsea"]]
    assert len(w.text.tokenizer(clean_caption(feature_texts["chelsea"]))["input_ids"]) > 120
    assert s["json"]["text_truncated"] is True and s["json"]["n_tokens"] == 120
    assert s["mask.npy"].all()


def test_identical_texts_are_encoded_once_and_agree(square_run, feature_texts):
    store, _, records = square_run
    keys = by_stem(store)
    samples = all_samples(store)
    a, b = samples[keys["rocket"]], samples[keys["camera"]]
    assert (
        a["json"]["caption"]
        == b["json"]["caption"]
        == feature_texts["rocket"]
        == feature_texts["camera"]
    )
    np.testing.assert_array_equal(a["t5.npy"], b["t5.npy"])
    assert (
        sum(r["distinct_texts"] for r in records.values())
        < sum(r["ok"] for r in records.values()) + 1
    )


def test_webdataset_reads_the_shards(square_run):
    import webdataset as wds

    store, _, _ = square_run
    urls = [str(Path(store) / STAGE / f"{s}.tar") for s in Store(store).shards()]
    n_ok = 0
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode():
        info = sample["json"]
        if info["error"] is None:
            n_ok += 1
            assert sample["t5.npy"].shape == (120, 64) and sample["vae.npy"].shape[:2] == (2, 4)
    assert n_ok == 7


def test_multi_scale_latents_decode_to_the_bucket(feature_store, square_run):
    w = reuse(square_run[1], feature_store, multi_scale=True)
    for shard in Store(feature_store).shards():
        w(shard)
    keys = by_stem(feature_store)
    samples = all_samples(feature_store)
    assert samples[keys["wide"]]["json"]["bucket"] == [128, 512]  # 10:1 → the 0.25 bucket
    assert samples[keys["tall"]]["json"]["bucket"] == [512, 128]  # 1:6.7 → the 4.0 bucket
    assert samples[keys["coffee"]]["json"]["bucket"] == [208, 304]  # 600×400 (w×h) → "0.68"
    for stem in ("wide", "tall", "coffee"):
        s = samples[keys[stem]]
        h, w_ = s["json"]["bucket"]
        assert s["vae.npy"].shape == (2, 4, h // 8, w_ // 8)
        if stem != "coffee":  # decode the two extremes (the decoder is the slow part on CPU)
            img = w.vae.decode(s["vae.npy"][:1].astype(np.float32))
            assert img.shape == (1, h, w_, 3) and img.dtype == np.uint8


def test_caption_tag_source_and_view(feature_store, square_run):
    """Captions from a caption stage (error rows → "no caption"), restricted to a view."""
    from pipeline.views import create_view

    st = Store(feature_store)
    keys = by_stem(feature_store)
    # A caption stage's output as the captioning stage writes it: every ok key, error column.
    for shard in st.shards():
        rows = st.ok_keys(shard)
        caps = [None if k == keys["rocket"] else f"a caption for {k}" for k in rows]
        errs = ["model failed" if k == keys["rocket"] else None for k in rows]
        url = st.url("captions", "cap", f"{shard}.parquet")
        fs.write_parquet(url, pa.table({"key": rows, "caption": caps, "error": errs}))
        st.write_status("captions/cap", shard, {"rows": len(rows), "output": f"{shard}.parquet"})
    create_view(st, "people", "label = 'person' or label = 'rocket'")
    w = reuse(square_run[1], feature_store, captions="cap", view="people")
    recs = {s: w(s) for s in st.shards()}
    samples = all_samples(feature_store)
    want = {keys["astronaut"], keys["camera"], keys["rocket"]}
    assert set(samples) == want
    order = [k for s in st.shards() for k in st.ok_keys(s) if k in want]
    got = [k for s in st.shards() for k in read_tar(Path(feature_store) / STAGE / f"{s}.tar")]
    assert got == order
    assert samples[keys["rocket"]]["json"]["error"] == "no caption"
    camera = samples[keys["camera"]]["json"]["caption"]  # PixArt's cleaning drops the hex id
    assert camera == clean_caption(f"a caption for {keys['camera']}") == "a caption for camera"
    # Shards without view keys still get an (empty) tar and a status record.
    empty = [s for s, r in recs.items() if r["rows"] == 0]
    assert empty and all(read_tar(Path(feature_store) / STAGE / f"{s}.tar") == {} for s in empty)


def test_label_source(feature_store, square_run):
    w = reuse(square_run[1], feature_store, captions="label")
    w(Store(feature_store).shards()[0])
    samples = read_tar(Path(feature_store) / STAGE / "000000.tar")
    assert {s["json"]["caption"] for s in samples.values()} <= {
        f"a photo of a {lab}" for lab in ("person", "cat", "cup", "rocket", "strip")
    }


def test_extract_features_through_ray(feature_store, ray_local):
    summary = extract_features(
        feature_store, 256, t5="tiny", vae="tiny", multi_scale=True, progress=False, use_ray=True
    )
    assert summary.ok and len(summary.done) == 3 and summary.rows == 8
    assert dict(summary.errors) == {"empty caption after cleaning": 1}
    tag = default_tag("tiny", "tiny", 256, True, "alt")
    assert tag == "tiny_tiny_256ms_alt"
    manifest = json.loads((Path(feature_store) / "manifest.json").read_text())
    settings = manifest["stages"][f"features/{tag}"]["settings"]
    assert settings["vae_scale_factor"] == pytest.approx(0.18215)
    assert (
        settings["max_length"] == 120
        and settings["t5_dim"] == 64
        and len(settings["buckets"]) == 40
    )
    assert set(manifest["stages"][f"features/{tag}"]["shards"]) == {"000000", "000001", "000002"}
    assert (Path(feature_store) / "features" / tag / "_null.npz").exists()
    again = extract_features(
        feature_store, 256, t5="tiny", vae="tiny", multi_scale=True, progress=False
    )
    assert again.skipped == ["000000", "000001", "000002"] and not again.done
    with pytest.raises(StoreError, match="other settings"):
        extract_features(
            feature_store,
            256,
            t5="tiny",
            vae="tiny",
            multi_scale=True,
            max_length=64,
            tag=tag,
            progress=False,
        )


def test_cli_reports_user_errors(feature_store, capsys):
    from pipeline.cli import main

    base = ["features", "--store", feature_store, "--t5", "tiny", "--vae", "tiny", "--no-progress"]
    assert main([*base, "--resolution", "256", "--view", "nope"]) == 2
    assert "no view 'nope'" in capsys.readouterr().err
    assert main([*base, "--resolution", "256", "--captions", "llava"]) == 2
    assert "no captions/llava" in capsys.readouterr().err
    assert main([*base, "--resolution", "256", "--tag", "a/b"]) == 2
    assert "bad --tag 'a/b'" in capsys.readouterr().err
    assert main([*base, "--resolution", "256", "--t5", "./missing-dir"]) == 2
    assert "--t5 ./missing-dir: no such folder" in capsys.readouterr().err
    assert main([*base, "--resolution", "300"]) == 2  # argparse's own exit code, returned
    assert "invalid choice: 300" in capsys.readouterr().err


def test_vae_dtype_is_a_setting_and_bf16_rounds_the_latents(square_run, tmp_path):
    """fp32 is the default; ``vae_dtype="bf16"`` loads the VAE in bf16 and its latents differ."""
    import shutil

    store, w, _ = square_run
    assert w.vae.dtype == torch.float32
    copy = tmp_path / "store"
    shutil.copytree(store, copy, ignore=shutil.ignore_patterns("features", "_status"))
    bf = worker(str(copy), vae_dtype="bf16")
    assert bf.vae.dtype == torch.bfloat16
    shard = Store(store).shards()[0]
    rec = bf(shard)
    assert rec["settings"]["vae_dtype"] == "bf16" and rec["model"]["vae_dtype"] == "bfloat16"
    key = Store(store).ok_keys(shard)[0]
    ref = read_tar(Path(store) / STAGE / f"{shard}.tar")[key]["vae.npy"].astype(np.float32)
    got = read_tar(copy / STAGE / f"{shard}.tar")[key]["vae.npy"].astype(np.float32)
    assert 0 < np.abs(got - ref).max() < 0.1 * np.abs(ref).max()


def test_settings_are_validated():
    with pytest.raises(ValueError, match="--resolution must be one of 256, 512, 1024, got 768"):
        FeatureSettings(resolution=768)
    with pytest.raises(ValueError, match="--batch-size must be >= 1, got 0"):
        FeatureSettings(resolution=256, batch_size=0)
    with pytest.raises(ValueError, match="--vae-dtype must be one of fp32, fp16, bf16, got 'fp8'"):
        FeatureSettings(resolution=256, vae_dtype="fp8")


@pytest.mark.parametrize(
    "raw,clean",
    [
        ("A <b>Cat</b> on a   sofa!!!", "a cat on a sofa!!!"),  # PixArt keeps "!!!"
        ("see https://example.com/x now", "see now"),
        ("Photo by @someone &amp; friends", "photo by friends"),
        ("IMG_1234.JPG a dog", "a dog"),
        ("line one\\nline two", "line one line two"),
        ("  “Quoted”  ", "quoted"),
        ("black-and-white photo... of a dog", "black-and-white photo of a dog"),
        ('<a href="http://x.com/a">Golden retriever</a> on grass', "golden retriever on grass"),
        ("<PERSON> at the premiere", "person at the premiere"),
        ("this-is-my-cute-cat", "this is my cute cat"),  # > 3 separators: a slug
        ("Wallpaper 1920x1080 FREE SHIPPING", "wallpaper"),
    ],
)
def test_clean_caption(raw, clean):
    assert clean_caption(raw) == clean


def test_clean_caption_matches_pixart_on_web_alt_texts():
    """PixArt's own ``text_preprocessing`` outputs (tests/data/SOURCES.md) for 236 alt-texts."""
    path = Path(__file__).parents[1] / "data" / "pixart_clean_caption.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 150
    differ = [(r["input"], r["pixart"], clean_caption(r["input"])) for r in rows]
    differ = [d for d in differ if d[1] != d[2]]
    assert len(differ) <= 0.02 * len(rows), differ[:10]


def test_tiny_presets_load_like_downloads(tmp_path):
    from transformers import AutoTokenizer

    from training.feature_models import resolve_t5, resolve_vae, vae_config

    source, enc, tok_sub = resolve_t5("tiny")
    tok = AutoTokenizer.from_pretrained(source, subfolder=tok_sub)
    ids = tok("a photo of a cat")["input_ids"]
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0
    cfg = vae_config("tiny")
    assert cfg["latent_channels"] == 4 and len(cfg["block_out_channels"]) == 4  # downsample 8
    assert resolve_vae("tiny")[1] is None and enc == "text_encoder"


def test_a_failed_shard_leaves_no_output(feature_store, square_run):
    """A shard-level failure (its caption shard is missing) raises for a retry and writes nothing."""
    st = Store(feature_store)
    for shard in st.shards():  # the caption stage finished only shard 000000
        rows = st.ok_keys(shard)
        table = pa.table(
            {"key": rows, "caption": ["a caption"] * len(rows), "error": [None] * len(rows)}
        )
        fs.write_parquet(st.url("captions", "cap", f"{shard}.parquet"), table)
    (Path(feature_store) / "captions" / "cap" / "000001.parquet").unlink()
    w = reuse(square_run[1], feature_store, captions="cap")
    assert w("000000")["ok"] == 3
    with pytest.raises(StoreError, match="captions/cap has no shard 000001"):
        w("000001")
    out = Path(feature_store) / STAGE
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "_null.npz"]
    assert st.status(STAGE, "000001") is None
