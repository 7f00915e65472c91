"""Benchmark (CPU): the feature stage against its bare models, measured in the same run.

    .venv/bin/python bench/features.py [--images 48] [--resolution 256] [--reps 2] [--out FILE.json]

Builds a store of real photos (scikit-image, cropped to varied aspect ratios, each with a distinct
caption) and two small random-weight models saved to folders: a T5 v1.1-style encoder (d_model
256, 4 layers) with the tiny Unigram tokenizer, and an SD-layout VAE (4 blocks, widths 16-64).

  bare   the models alone on inputs prepared beforehand: T5 forward on pre-tokenised captions
         (the stage's batching: sorted by length, padded to the batch's longest) + VAE encode of
         the already-cropped images (same batch size), outputs copied to host as fp16.
  stage  `FeatureWorker` called on every shard, as a Ray actor calls it once its models are
         loaded: read meta + images, clean and tokenise captions, decode and crop in threads,
         both models, write the WebDataset shard and its status record.

ratio = bare seconds / stage seconds (target >= 0.85), per rep (bare and stage side by side,
alternating which goes first), median over ``--reps``. The end-to-end
``extract_features(use_ray=False)`` (model loading and manifest included) is timed once more and
reported beside it. `bench/gpu_features.py` reuses the helpers below.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SKIMAGE = ("astronaut", "chelsea", "coffee", "rocket", "camera", "immunohistochemistry", "cat")


# ---- shared helpers (also used by bench/gpu_features.py) -----------------------------------------
def caption(rng: random.Random, words: tuple[int, int]) -> str:
    from training.feature_models import _WORDS

    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*words)))


def make_photos(
    folder: Path, n: int, long_side: int, words: tuple[int, int] = (8, 40), seed: int = 0
) -> None:
    """``n`` JPEGs from the scikit-image photos: random crops (aspect 0.4-2.5) resized so the long
    side is about ``long_side``, each with a distinct caption in a ``.txt`` sidecar."""
    from photos import source_images  # bench/photos.py
    from PIL import Image

    rng = random.Random(seed)
    sources = source_images(SKIMAGE, test_photos=False)
    folder.mkdir(parents=True, exist_ok=True)

    def one(i: int) -> None:
        r = random.Random(seed * 100003 + i)
        img = sources[i % len(sources)]
        w, h = img.size
        aspect = math.exp(r.uniform(-0.9, 0.9))  # w / h between ~0.4 and ~2.5
        cw = min(w, int(h * aspect))
        ch = min(h, int(cw / aspect))
        x, y = r.randint(0, w - cw), r.randint(0, h - ch)
        crop = img.crop((x, y, x + cw, y + ch))
        s = long_side * r.uniform(0.9, 1.1) / max(cw, ch)
        crop = crop.resize(
            (max(16, round(cw * s)), max(16, round(ch * s))), Image.Resampling.BICUBIC
        )
        crop.save(folder / f"img{i:05d}.jpg", quality=90)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(one, range(n)))
    for i in range(n):
        (folder / f"img{i:05d}.txt").write_text(f"{i} " + caption(rng, words))


def make_store(root: Path, photos: Path, shard_size: int) -> str:
    from pipeline.ingest.folder import folder_samples
    from pipeline.ingest.writer import IngestConfig, ingest
    from pipeline.store import Store

    workers = max(1, min(8, os.cpu_count() or 1))
    cfg = IngestConfig(shard_size=shard_size, workers=workers)
    ingest(Store(str(root)), folder_samples(str(photos)), "folder", cfg, progress=False)
    return str(root)


def shard_texts_and_crops(
    store: str, shards: list[str], resolution: int, multi_scale: bool = False
) -> tuple[list[str], dict[tuple[int, int], list[Any]]]:
    """What the bare models are fed: the cleaned captions, and the crops grouped by bucket."""
    from pipeline.store import Store
    from training.features import prepare_image
    from training.text import clean_caption

    st = Store(store)
    texts: list[str] = []
    crops: dict[tuple[int, int], list[Any]] = {}
    for shard in shards:
        meta = {r["key"]: r for r in st.read_meta(shard, ["key", "alt_text"]).to_pylist()}
        for key, _ext, data in st.iter_images(shard):
            texts.append(clean_caption(meta[key]["alt_text"]))
            arr, bucket = prepare_image(data, resolution, multi_scale)
            crops.setdefault(bucket, []).append(arr)
    return texts, crops


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_t5(
    model: Any, tokenizer: Any, texts: list[str], batch: int, max_length: int, padded: bool
) -> float:
    """Seconds for T5 forward + fp16 copy to host over ``texts``, tokenised beforehand.

    ``padded``: every text padded to ``max_length`` (PixArt's scripts); else sorted by length and
    padded per batch (what the stage does)."""
    import torch

    device = str(next(model.parameters()).device)
    if padded:
        order = texts
    else:
        lengths = [
            len(x) for x in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        ]
        order = [t for _, t in sorted(zip(lengths, texts, strict=True), key=lambda p: -p[0])]
    batches = []
    for i in range(0, len(order), batch):
        tok = tokenizer(
            order[i : i + batch],
            max_length=max_length,
            truncation=True,
            padding="max_length" if padded else "longest",
            return_tensors="pt",
        )
        batches.append((tok["input_ids"].to(device), tok["attention_mask"].to(device)))
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        for ids, mask in batches:
            model(input_ids=ids, attention_mask=mask).last_hidden_state.to(torch.float16).cpu()
    sync(device)
    return time.perf_counter() - start


def bare_vae(vae: Any, crops: dict[tuple[int, int], list[Any]], batch: int) -> float:
    """Seconds for VAE encode → [mean, std] fp16 on host, batches already on the device."""
    import numpy as np
    import torch

    p = next(vae.parameters())
    batches = []
    for arrs in crops.values():
        for i in range(0, len(arrs), batch):
            x = torch.from_numpy(np.stack(arrs[i : i + batch])).to(p.device).permute(0, 3, 1, 2)
            batches.append((x.float() / 127.5 - 1.0).to(p.dtype))
    sync(str(p.device))
    start = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            dist = vae.encode(x).latent_dist
            torch.stack([dist.mean, dist.std], dim=1).to(torch.float16).cpu()
    sync(str(p.device))
    return time.perf_counter() - start


def run_stage_worker(worker: Any, shards: list[str]) -> tuple[float, list[dict]]:
    start = time.perf_counter()
    records = [worker(s) for s in shards]
    sync(str(worker.vae.device))
    return time.perf_counter() - start, records


# ---- the CPU benchmark ------------------------------------------------------------------------------
def small_models(folder: Path) -> tuple[str, str]:
    """Save a small T5 encoder (+ tiny tokenizer) and a small SD-layout VAE; return their dirs."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    from training.feature_models import build_tiny_tokenizer

    t5_dir, vae_dir = folder / "t5", folder / "vae"
    tok = build_tiny_tokenizer(str(t5_dir / "tokenizer"))
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=(len(tok) + 127) // 128 * 128, d_model=256, d_kv=32, d_ff=1024, num_layers=4,
        num_heads=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
    )  # fmt: skip
    T5EncoderModel(cfg).save_pretrained(t5_dir / "text_encoder")
    AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 64, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
    ).save_pretrained(vae_dir)
    return str(t5_dir), str(vae_dir)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=16)
    ap.add_argument("--resolution", type=int, default=256, choices=(256, 512, 1024))
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--text-batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="stage decode threads (0: min(8, CPUs))")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the figures as JSON here too")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-features-"))
    os.environ.setdefault("ALPHASET_CACHE", str(work / "cache"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import torch

        from pipeline.store import Store
        from training.feature_models import load_t5, load_vae
        from training.features import FeatureWorker, extract_features

        make_photos(work / "photos", args.images, long_side=512, words=(8, 40))
        store = make_store(work / "store", work / "photos", args.shard_size)
        shards = Store(store).shards()
        t5_dir, vae_dir = small_models(work / "models")
        texts, crops = shard_texts_and_crops(store, shards, args.resolution)
        model, tok = load_t5(t5_dir, torch.float32, "cpu")
        vae = load_vae(vae_dir, torch.float32, "cpu")
        settings = dict(
            resolution=args.resolution, captions="alt", batch_size=args.batch_size,
            text_batch_size=args.text_batch_size, threads=args.threads,
        )  # fmt: skip
        t = time.perf_counter()
        worker = FeatureWorker(store, "features/warmup", t5=t5_dir, vae=vae_dir, **settings)
        load_s = time.perf_counter() - t
        worker(shards[0])  # warm-up: first-call costs (allocator, thread pools)
        bare_t5(model, tok, texts[: args.text_batch_size], args.text_batch_size, 120, padded=False)

        # Bare and stage alternate, in both orders, and each rep gives its own ratio: on a shared
        # machine the load drifts, so only measurements taken side by side are compared.
        t5_s, t5_pad_s, vae_s, stage_s, ratios = [], [], [], [], []
        records: list[dict] = []

        def run_bare() -> None:
            t5_s.append(bare_t5(model, tok, texts, args.text_batch_size, 120, padded=False))
            t5_pad_s.append(bare_t5(model, tok, texts, args.text_batch_size, 120, padded=True))
            vae_s.append(bare_vae(vae, crops, args.batch_size))

        def run_worker(rep: int) -> None:
            worker.stage = f"features/rep{rep}"
            secs, records[:] = run_stage_worker(worker, shards)
            stage_s.append(secs)

        for rep in range(args.reps):
            if rep % 2 == 0:
                run_bare()
                run_worker(rep)
            else:
                run_worker(rep)
                run_bare()
            ratios.append((t5_s[-1] + vae_s[-1]) / stage_s[-1])
        t = time.perf_counter()
        extract_features(
            store, args.resolution, t5=t5_dir, vae=vae_dir, captions="alt", tag="e2e",
            batch_size=args.batch_size, text_batch_size=args.text_batch_size,
            threads=args.threads, use_ray=False, progress=False,
        )  # fmt: skip
        e2e_s = time.perf_counter() - t
        n = len(texts)
        bare_s = statistics.median(a + b for a, b in zip(t5_s, vae_s, strict=True))
        res = {
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "images": n,
            "shards": len(shards),
            "resolution": args.resolution,
            "buckets": {f"{h}x{w}": len(v) for (h, w), v in crops.items()},
            "bare_t5_sorted_s": [round(x, 3) for x in t5_s],
            "bare_t5_padded120_s": [round(x, 3) for x in t5_pad_s],
            "bare_vae_s": [round(x, 3) for x in vae_s],
            "stage_s": [round(x, 3) for x in stage_s],
            "ratio_by_rep": [round(x, 3) for x in ratios],
            "ratio": round(statistics.median(ratios), 3),
            "stage_errors": sum(r["errors"] for r in records),
            "stage_img_per_s": round(n / statistics.median(stage_s), 2),
            "model_load_s": round(load_s, 3),
            "end_to_end_s": round(e2e_s, 3),
            "ratio_end_to_end": round(bare_s / e2e_s, 3),
        }
        print(json.dumps(res, indent=1))
        print(
            f"stage vs bare models (T5 + VAE) on {n} images, median of {args.reps} side-by-side reps: "
            f"ratio {res['ratio']:.3f} (target >= 0.85; reps {res['ratio_by_rep']}); end to end "
            f"with model loading and manifest {e2e_s:.2f}s vs median bare {bare_s:.2f}s: "
            f"ratio {res['ratio_end_to_end']:.3f}"
        )
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
