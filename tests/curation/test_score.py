import hashlib
import io
import json
import shutil
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageFilter

from curation.aesthetic import EXPECTED_KEYS, load_head, save_random_head
from curation.decode import ClipInput, decode_for_scoring, laplacian_variance
from curation.models import TINY_CONFIG, default_tag, load_clip, resolve_clip
from curation.score import ScoreConfig, ScoreWorker, score_store, text_sim_column
from pipeline import fs
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.models import ModelNotFoundError
from pipeline.store import Store, StoreError, iter_tar_samples, write_tar

SCORE_COLUMNS = [
    "key", "error", "clip_aesthetic", "clip_text_sim", "width", "height", "aspect", "megapixels", "sharpness", "phash",
]  # fmt: skip


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def read(store: Store, stage: str, shard: str):
    return pq.read_table(fs.join(store.stage_dir(stage), f"{shard}.parquet"))


def test_outputs_are_shard_aligned_with_all_columns(scored_store):
    dim = TINY_CONFIG["embed_dim"]
    for shard in scored_store.shards():
        meta = scored_store.read_meta(shard).to_pydict()
        ok = [i for i, s in enumerate(meta["status"]) if s == "ok"]
        scores, emb = (
            read(scored_store, "scores/tiny", shard),
            read(scored_store, "embeddings/tiny", shard),
        )
        assert scores.column_names == SCORE_COLUMNS
        assert scores["key"].to_pylist() == emb["key"].to_pylist() == [meta["key"][i] for i in ok]
        assert (
            str(emb.schema.field("embedding").type) == f"fixed_size_list<element: halffloat>[{dim}]"
        )
        vecs = np.array(emb["embedding"].to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=2e-3)
        s = scores.to_pydict()
        assert s["width"] == [meta["width"][i] for i in ok] and s["height"] == [
            meta["height"][i] for i in ok
        ]
        np.testing.assert_allclose(
            s["aspect"], np.array(s["width"]) / np.array(s["height"]), rtol=1e-6
        )
        np.testing.assert_allclose(
            s["megapixels"], np.array(s["width"]) * np.array(s["height"]) / 1e6, rtol=1e-6
        )
        assert all(len(h) == 16 and int(h, 16) >= 0 for h in s["phash"])
        assert all(v > 0 for v in s["sharpness"]) and all(e is None for e in s["error"])
        assert all(1.0 < a < 10.0 for a in s["clip_aesthetic"])  # the tiny folder's head, mid-scale
        assert s["clip_text_sim"] == [None] * len(ok)  # folder photos have no alt text
        for stage in ("scores/tiny", "embeddings/tiny"):
            rec = scored_store.status(stage, shard)
            data = fs.read_bytes(fs.join(scored_store.stage_dir(stage), f"{shard}.parquet"))
            assert rec["checksum"] == hashlib.sha256(data).hexdigest()
            assert rec["rows"] == rec["ok"] == len(ok) and rec["errors"] == 0
    manifest = scored_store.read_manifest()
    assert {"scores/tiny", "embeddings/tiny"} <= set(manifest["stages"])


def test_stage_embeddings_match_open_clip_reference(photos_dir):
    """Our crop (PIL, uint8) + on-device normalisation reproduces open_clip's own preprocess."""
    import open_clip

    clip = load_clip("tiny", "cpu")
    _, _, preprocess = open_clip.create_model_and_transforms(clip.source.model_name)
    names = ["astronaut.jpg", "chelsea.png", "rocket.png"]  # square, landscape 3:2, landscape
    imgs = [Image.open(photos_dir / n).convert("RGB") for n in names]
    imgs.append(imgs[1].transpose(Image.Transpose.ROTATE_90))  # portrait
    ref = torch.stack([preprocess(im) for im in imgs])
    ours = clip.input.normalize(
        torch.from_numpy(np.stack([clip.input.crop(im) for im in imgs])), torch.float32
    )
    assert ours.shape == ref.shape == (4, 3, 64, 64)
    assert (ours - ref).abs().max() < 1e-5
    with torch.inference_mode():
        e_ref = clip.model.encode_image(ref, normalize=True)
        e_ours = clip.model.encode_image(ours, normalize=True)
    assert torch.allclose(e_ref, e_ours, atol=1e-5)


def test_text_similarity_with_alt_text_and_caption_tags(photos_dir, tmp_path, make_store):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("astronaut.jpg", "coffee.jpg", "chelsea.png"):
        shutil.copy(photos_dir / name, src / name)
    (src / "astronaut.txt").write_text("an astronaut in a white suit")
    (src / "coffee.txt").write_text("a cup of coffee")
    store = make_store(tmp_path / "store", src, shard_size=10)
    meta = store.read_meta("000000").to_pydict()
    keys = meta["key"]
    # A caption stage as the captioner writes it: key, caption, error + its status record.
    import pyarrow as pa

    caps = ["a photo of a cat" if "chelsea" in k else f"caption {i}" for i, k in enumerate(keys)]
    caps[0] = None  # an error row of the captioner
    fs.write_parquet(fs.join(store.stage_dir("captions/llava-1.5.t"), "000000.parquet"),
                     pa.table({"key": keys, "caption": caps, "error": [None] * len(keys)}))  # fmt: skip
    store.write_status("captions/llava-1.5.t", "000000", {"rows": len(keys)})
    score_store(
        store,
        ScoreConfig(clip="tiny", batch_size=2, decode_workers=1),
        progress=False,
        use_ray=False,
    )
    s = read(store, "scores/tiny", "000000").to_pydict()
    col = text_sim_column("llava-1.5.t")
    assert col == "clip_text_sim_llava_1_5_t" and col in s
    assert [v is None for v in s["clip_text_sim"]] == [t is None for t in meta["alt_text"]]
    assert s[col][0] is None and all(v is not None for v in s[col][1:])
    # The values are the cosine of open_clip's own normalised image and text embeddings.
    clip = load_clip("tiny", "cpu")
    emb = np.array(
        read(store, "embeddings/tiny", "000000")["embedding"].to_pylist(), dtype=np.float32
    )
    with torch.inference_mode():
        txt = clip.model.encode_text(clip.tokenizer([caps[1]]), normalize=True).numpy()[0]
    assert s[col][1] == pytest.approx(float(emb[1] @ txt), abs=5e-3)
    assert store.stage_config("scores/tiny")["settings"]["caption_tags"] == ["llava-1.5.t"]


def test_undecodable_and_missing_images_become_error_rows(photos_dir, tmp_path, make_store):
    store = make_store(tmp_path / "store", photos_dir, shard_size=10)
    samples = list(iter_tar_samples(store.image_url("000000")))
    (k0, f0), (k1, _f1) = samples[0], samples[1]
    ext = next(e for e in f0 if e != "json")
    f0[ext] = f0[ext][: len(f0[ext]) // 3]  # truncated
    write_tar(store.image_url("000000"), [s for s in samples if s[0] != k1])  # k1 missing
    rec = ScoreWorker(store.root, clip="tiny", tag="t", batch_size=4, decode_workers=1)("000000")
    s = read(store, "scores/t", "000000").to_pydict()
    err = dict(zip(s["key"], s["error"], strict=True))
    assert err[k0].startswith("truncated image") and err[k1] == "missing from image shard"
    assert sum(e is None for e in err.values()) == 4
    assert (
        rec["errors"] == 2
        and rec["ok"] == 4
        and rec["errors_by_reason"]["missing from image shard"] == 1
    )
    row = s["key"].index(k0)
    assert s["phash"][row] is None and s["clip_aesthetic"][row] is None and s["width"][row] is None
    emb = read(store, "embeddings/t", "000000")
    assert emb["embedding"].null_count == 2


def test_resume_skips_done_shards_and_refuses_other_settings(scored_store):
    again = score_store(scored_store, ScoreConfig(clip="tiny"), progress=False, use_ray=False)
    assert again.done == [] and len(again.skipped) == 3
    with pytest.raises(StoreError, match="other settings .*aesthetic"):
        score_store(
            scored_store, ScoreConfig(clip="tiny", aesthetic="none"), progress=False, use_ray=False
        )


def test_laion_head_file_format(tmp_path):
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    save_random_head(str(path), 768)
    state = torch.load(path, weights_only=True)
    assert (
        set(state)
        == EXPECTED_KEYS
        == {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}
    )
    assert [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)] == [
        (1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16),
    ]  # fmt: skip
    head = load_head(str(path))
    assert head.input_size == 768 and not head.training
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(1, 768)}, bad)
    with pytest.raises(UserError, match="not the LAION aesthetic MLP"):
        load_head(str(bad))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_head(str(tmp_path / "missing.pth"))


def test_head_width_must_match_clip(scored_store, tmp_path):
    path = tmp_path / "l14.pth"
    save_random_head(str(path), 768)
    with pytest.raises(UserError, match="takes 768-d embeddings but CLIP tiny makes 32-d"):
        ScoreWorker(scored_store.root, clip="tiny", tag="x", aesthetic=str(path))


def test_clip_values_resolve(tmp_path):
    src = resolve_clip("clip-vit-l-14")
    assert (src.model_name, src.pretrained, src.folder) == ("ViT-L-14", "openai", None)
    src = resolve_clip("ViT-B-32:/models/b32.bin")
    assert (src.model_name, src.pretrained) == ("ViT-B-32", "/models/b32.bin")
    assert resolve_clip("tiny").model_name.startswith("local-dir:")
    assert (
        default_tag("tiny") == "tiny"
        and default_tag("ViT-L-14:/w/vit-l-14.pt") == "ViT-L-14-vit-l-14"
    )
    with pytest.raises(ModelNotFoundError, match="unknown clip preset .*clip-vit-l-14"):
        resolve_clip("vit-huge")
    with pytest.raises(ModelNotFoundError, match="no open_clip_config.json"):
        resolve_clip(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="cannot load CLIP --clip ViT-B-32:/nope.bin"):
        load_clip("ViT-B-32:/nope.bin", "cpu")


def test_sharpness_is_lower_for_blurred_copies(photos_dir):
    img = Image.open(photos_dir / "astronaut.jpg")
    ci = ClipInput(64, (0.5,) * 3, (0.5,) * 3)
    sharp = decode_for_scoring("a", jpeg_bytes(img), ci)
    blurred = decode_for_scoring("b", jpeg_bytes(img.filter(ImageFilter.GaussianBlur(3))), ci)
    assert blurred.sharpness < sharp.sharpness / 4
    assert laplacian_variance(np.full((10, 10), 7, np.uint8)) == 0.0
    assert decode_for_scoring("c", b"not an image", ci).error.startswith("not an image")


def test_cli_score_through_ray(ray_local, dup_photos, tmp_path, capsys, make_store):
    store = make_store(tmp_path / "store", dup_photos, shard_size=5)
    args = [
        "score",
        "--store",
        store.root,
        "--clip",
        "tiny",
        "--batch-size",
        "4",
        "--decode-workers",
        "1",
        "--no-progress",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "scores/tiny: 2 shard(s) done" in out
    assert (
        sorted(store.completed("scores/tiny"))
        == sorted(store.completed("embeddings/tiny"))
        == ["000000", "000001"]
    )
    manifest = json.loads(fs.read_text(store.manifest_url))
    assert manifest["stages"]["scores/tiny"]["settings"]["clip"] == "tiny"
    assert main(args) == 0 and "2 skipped as already done" in capsys.readouterr().out


def test_cli_errors_are_one_line(scored_store, capsys):
    assert main(["score", "--store", scored_store.root, "--clip", "nope"]) == 2
    assert main(["score", "--store", scored_store.root, "--clip", "tiny", "--batch-size", "0"]) == 2
    assert main(["score", "--store", scored_store.root, "--clip", "tiny", "--tag", "dedup"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3
    assert (
        "unknown clip preset" in err[0]
        and "argument --batch-size: must be > 0, got 0" in err[1]
        and "--tag 'dedup'" in err[2]
    )


def test_a_dead_decode_process_fails_the_shard_and_the_retry_recovers(
    photos_dir, tmp_path, make_store
):
    import os
    import signal

    store = make_store(tmp_path / "store", photos_dir, shard_size=10)
    worker = ScoreWorker(store.root, clip="tiny", tag="retry", batch_size=4, decode_workers=1)
    try:
        assert worker("000000")["ok"] == 6
        for pid in list(worker._pool._pool._processes):  # the real child processes
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        with pytest.raises(RuntimeError, match="a decode process died while decoding shard 000000"):
            worker("000000")
        assert worker("000000")["ok"] == 6  # a fresh pool
    finally:
        worker.close()
