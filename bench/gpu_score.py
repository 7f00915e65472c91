"""Benchmark (GPU): ViT-L/14 at 224 px — the bare fp16 forward at batch 256 against the
`alphaset score` stage worker (called directly, no Ray), decode included, in the same run.
Target: stage >= 0.8x bare (the bare model ran 2,418 img/s on an H200).

Measured, in order, on one store of --n real-photo JPEGs (long side 512–1024 px, like a store
ingested with --max-side 1024):

1. bare   — `encode_image` on a random fp16 batch already on the GPU (the worker's own model);
2. stage  — `ScoreWorker(shard)` for every shard after a warm-up shard: tar read, decode, crop,
   technical scores, phash, forward, aesthetic head, Parquet + status writes;
3. decode — `curation.decode.DecodePool` alone over the same images (what decode can feed).

Shards hold --shard-size images (default 4096): the GPU idles while a shard's first batch
decodes, a cost of about one batch per shard, so GPU stores should use large shards
(``alphaset ingest --shard-size 5000`` or more); the run prints that per-shard cost.

    python bench/gpu_score.py                  # GPU: ViT-L-14, 4096 images, batch 256
    python bench/gpu_score.py --tiny           # CPU smoke run: tiny CLIP, 64 images
    python bench/gpu_score.py --json $OUT/gpu_score.json

Needs torch, open_clip_torch, pillow, numpy, pyarrow, fsspec, imagehash (scipy, PyWavelets),
safetensors, tqdm and scikit-image; not Ray.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

NEEDED = (
    "torch",
    "open_clip",
    "PIL",
    "numpy",
    "pyarrow",
    "fsspec",
    "imagehash",
    "safetensors",
    "tqdm",
    "skimage",
)
SIZES = (1024, 896, 768, 640, 512)


def check_imports() -> None:
    import importlib.util

    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(
            f"missing packages: {', '.join(missing)} (pip install them; see the module docstring)"
        )


def make_photos(out: Path, n: int, distinct: int = 256) -> None:
    """``n`` JPEG files: ``distinct`` crops/resizes of real photos, then hard links to reach n."""
    from photos import source_images  # bench/photos.py
    from PIL import Image

    sources = source_images()  # bench/photos.py's set
    distinct = min(distinct, n)
    for i in range(distinct):
        img = sources[i % len(sources)]
        w, h = img.size
        c = (i // len(sources)) % 5  # a different crop per round, so the files differ
        img = img.crop((c * w // 50, c * h // 50, w - c * w // 100, h - c * h // 100))
        side = SIZES[i % len(SIZES)]
        scale = side / max(img.size)
        img = img.resize(
            (round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC
        )
        img.save(out / f"{i:06d}.jpg", quality=90)
    for i in range(distinct, n):
        os.link(out / f"{i % distinct:06d}.jpg", out / f"{i:06d}.jpg")


def save_open_clip_folder(model_name: str, folder: Path) -> int:
    """Random-weight open_clip ``model_name`` as a local open_clip folder (fp16 safetensors)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    cfg = open_clip.get_model_config(model_name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": {}})
    )
    dev = (
        "cuda" if torch.cuda.is_available() else "cpu"
    )  # random init of 428M params: fast on a GPU
    with torch.random.fork_rng(), torch.device(dev):
        torch.manual_seed(0)
        model = open_clip.CLIP(**cfg)
    save_file(
        {k: v.half().cpu().contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    return int(cfg["embed_dim"])


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--tiny", action="store_true", help="CPU smoke run with the tiny CLIP (64 images)"
    )
    ap.add_argument("--n", type=int, default=None, help="images (default 4096; 64 with --tiny)")
    ap.add_argument(
        "--shard-size",
        type=int,
        default=None,
        help="images per shard (default 4096; 32 with --tiny)",
    )
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 (16 with --tiny)")
    ap.add_argument("--model", default="ViT-L-14")
    ap.add_argument(
        "--decode-workers",
        type=int,
        default=0,
        help="decode processes (0: CPU cores - 1, at most 16)",
    )
    ap.add_argument("--bare-iters", type=int, default=20)
    ap.add_argument(
        "--json", default=None, help="also write the results here (updated after each step)"
    )
    args = ap.parse_args()
    check_imports()
    import open_clip
    import torch

    from curation.aesthetic import save_random_head
    from curation.decode import DecodePool
    from curation.models import resolve_clip
    from curation.score import ScoreWorker
    from pipeline.ingest.folder import folder_samples
    from pipeline.ingest.writer import IngestConfig, ingest
    from pipeline.store import Store

    n = args.n or (64 if args.tiny else 4096)
    shard_size = args.shard_size or (32 if args.tiny else 4096)
    batch = args.batch_size or (16 if args.tiny else 256)
    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device; use --tiny for the CPU smoke run")
    cores = os.cpu_count() or 1
    workers = args.decode_workers or max(1, min(16, cores - 1))
    res: dict = {
        "n": n,
        "batch": batch,
        "shard_size": shard_size,
        "cores": cores,
        "decode_workers": workers,
    }
    res.update(torch=torch.__version__, open_clip=open_clip.__version__)
    res["device"] = (
        torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    )

    def record(**kw) -> None:  # written after every step, so a time cap still leaves figures
        res.update(kw)
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=1))

    tmp = Path(tempfile.mkdtemp(prefix="bench-gpu-score-"))
    try:
        # 0. Inputs: a store of real-photo JPEGs; the model as an open_clip folder + a random head.
        t = time.perf_counter()
        (tmp / "photos").mkdir()
        make_photos(tmp / "photos", n)
        store = Store(str(tmp / "store"))
        cfg = IngestConfig(shard_size=shard_size, workers=min(cores, 16))
        ingest(store, folder_samples(str(tmp / "photos")), "folder", cfg, progress=False)
        shards = store.shards()
        if args.tiny:
            clip_value = "tiny"
            head = os.path.join(resolve_clip("tiny").folder, "aesthetic.pth")
            model_name = "tiny (random)"
        else:
            folder = tmp / "clip"
            dim = save_open_clip_folder(args.model, folder)
            head = str(folder / "aesthetic.pth")
            save_random_head(head, dim)
            clip_value = str(folder)
            model_name = f"{args.model} (random weights, fp16)"
        record(model=model_name, setup_s=time.perf_counter() - t)
        print(
            f"setup: {n} images in {len(shards)} shards, model saved, {res['setup_s']:.0f} s",
            flush=True,
        )

        # 1. The stage worker (it loads the model once; the bare run below uses that same model).
        t = time.perf_counter()
        worker = ScoreWorker(
            store.root, clip=clip_value, tag="bench", aesthetic=head,
            batch_size=batch, device=device, decode_workers=workers,
        )  # fmt: skip
        record(load_s=time.perf_counter() - t)

        # 2. Bare: the model alone on a ready batch on the device.
        clip = worker.clip
        s = clip.input.size
        x = torch.randn(batch, 3, s, s, device=device, dtype=clip.dtype)
        with torch.inference_mode():
            for _ in range(3):
                clip.model.encode_image(x, normalize=True)
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(args.bare_iters):
                clip.model.encode_image(x, normalize=True)
            if device == "cuda":
                torch.cuda.synchronize()
        record(bare_img_s=batch * args.bare_iters / (time.perf_counter() - t))
        print(f"bare forward       : {res['bare_img_s']:9.1f} img/s", flush=True)
        del x

        # 3. The stage, decode included: a warm-up shard, then every shard timed.
        worker(shards[0])
        t = time.perf_counter()
        per_shard = []
        for shard in shards:
            t0 = time.perf_counter()
            worker(shard)
            per_shard.append(round(time.perf_counter() - t0, 3))
        stage = n / (time.perf_counter() - t)
        worker.close()
        record(stage_img_s=stage, ratio=stage / res["bare_img_s"], stage_shard_s=per_shard)
        print(f"stage (score)      : {stage:9.1f} img/s  (per shard: {per_shard} s)", flush=True)
        print(f"ratio stage/bare   : {res['ratio']:.3f}  (target >= 0.8)", flush=True)

        # 4. Decode alone: what the CPU side can feed (over at most 2048 images).
        pool = DecodePool(clip.input, workers)
        items = [(k, d) for shard in shards for k, _e, d in store.iter_images(shard)][:2048]
        list(pool.imap(iter(items[: 2 * batch]), depth=2 * batch))  # start the processes
        t = time.perf_counter()
        count = sum(1 for _ in pool.imap(iter(items), depth=2 * batch))
        pool.close()
        decode = count / (time.perf_counter() - t)
        # The GPU idles at a shard's start while the first batch decodes.
        record(
            decode_img_s=decode,
            decode_img_s_per_process=decode / workers,
            shard_start_s=batch / decode,
        )
        print(
            f"decode only        : {decode:9.1f} img/s  ({workers} processes, {decode / workers:.0f} img/s each)"
        )
        print(
            f"device: {res['device']}, {cores} CPU cores, torch {res['torch']}, open_clip {res['open_clip']}"
        )
        print(
            f"model: {model_name}, batch {batch}, {n} images, {len(shards)} shards of {shard_size}"
        )
        print(f"est. GPU idle at each shard start: {res['shard_start_s']:.2f} s")
        if decode < res["bare_img_s"]:
            print(
                f"decode is the bottleneck: ~{res['bare_img_s'] / (decode / workers):.0f} decode processes would match the bare model"
            )
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
