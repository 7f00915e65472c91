"""Benchmark (CPU): the `alphaset score` stage worker against the bare open_clip batched forward on
the same images, in the same run. Target: stage >= 0.85x the bare model's images/s.

The model is open_clip ViT-B-32 at random weights, saved once as an open_clip folder and loaded
by both sides. The bare side is the model alone: images decoded and preprocessed with open_clip's
own transform beforehand (not timed), then `encode_image` in batches. The stage side is
`curation.score.ScoreWorker` called on every shard (no Ray): tar read, decode (process pool),
crop, technical scores and phash, the forward, a LAION-format aesthetic head, both Parquet files
and the status records. Model loading is outside both timings; each side gets a warm-up first, and
the two alternate shard by shard for --rounds rounds, so load from other processes on a shared
machine hits both sides alike; the ratio is of the total times.

    .venv/bin/python bench/score.py --n 96 --batch-size 32 --rounds 3
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from photos import photo_store  # noqa: E402  (bench/photos.py)

from curation.aesthetic import save_random_head  # noqa: E402
from curation.score import ScoreWorker  # noqa: E402


def save_open_clip_folder(model_name: str, folder: Path, seed: int = 0) -> int:
    """Random-weight open_clip ``model_name`` saved as a local folder; returns its embedding width."""
    import open_clip
    from safetensors.torch import save_file

    cfg = open_clip.get_model_config(model_name)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": {}})
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(folder / "open_clip_model.safetensors"),
    )
    return int(cfg["embed_dim"])


def bare_seconds(model, batches: list[torch.Tensor]) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        for x in batches:
            model.encode_image(x, normalize=True)
        return time.perf_counter() - start


def stage_seconds(worker: ScoreWorker, shard: str) -> float:
    start = time.perf_counter()
    worker(shard)
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=96, help="images (default 96)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--decode-workers", type=int, default=0, help="0: CPU cores - 1")
    args = ap.parse_args()
    import open_clip

    tmp = Path(tempfile.mkdtemp(prefix="bench-score-"))
    try:
        # 1. Inputs: real photos in a store; the model as an open_clip folder (+ a random head).
        store = photo_store(tmp, args.n, args.shard_size)
        shards = store.shards()
        folder = tmp / "clip"
        dim = save_open_clip_folder(args.model, folder)
        save_random_head(str(folder / "aesthetic.pth"), dim)

        # 2. Bare: the same weights, inputs preprocessed beforehand by open_clip's transform.
        model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(folder))
        model.eval()
        per_shard: dict[str, list[torch.Tensor]] = {}
        for shard in shards:
            x = torch.stack(
                [
                    preprocess(Image.open(io.BytesIO(d)).convert("RGB"))
                    for _k, _e, d in store.iter_images(shard)
                ]
            )
            per_shard[shard] = [
                x[i : i + args.batch_size] for i in range(0, len(x), args.batch_size)
            ]
        n = sum(sum(len(b) for b in v) for v in per_shard.values())

        # 3. Stage: the worker as Ray would run it, called directly.
        worker = ScoreWorker(
            store.root,
            clip=str(folder),
            tag="bench",
            aesthetic=str(folder / "aesthetic.pth"),
            batch_size=args.batch_size,
            device="cpu",
            decode_workers=args.decode_workers,
        )
        bare_seconds(model, per_shard[shards[0]][:1])  # warm-up
        worker(shards[0])  # warm-up (also starts the decode processes)
        # 4. Interleaved shard by shard, so load from other processes hits both sides alike.
        bare_t, stage_t, pair_ratios = 0.0, 0.0, []
        for _ in range(args.rounds):
            for shard in shards:
                b = bare_seconds(model, per_shard[shard])
                s = stage_seconds(worker, shard)
                bare_t, stage_t = bare_t + b, stage_t + s
                pair_ratios.append(b / s)
        worker.close()
        bare_rate, stage_rate = args.rounds * n / bare_t, args.rounds * n / stage_t
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), load avg {os.getloadavg()[0]:.1f}"
        )
        print(
            f"{args.model} random weights, {n} images ({len(shards)} shards) x {args.rounds} rounds, "
            f"batch {args.batch_size}, fp32 CPU, decode workers {worker.decode_workers}"
        )
        print(f"bare open_clip forward : {bare_rate:7.2f} img/s")
        print(f"alphaset score worker  : {stage_rate:7.2f} img/s")
        print(
            f"ratio stage/bare: {stage_rate / bare_rate:.3f} (total time; median of per-shard pairs "
            f"{statistics.median(pair_ratios):.3f}, range {min(pair_ratios):.2f}-{max(pair_ratios):.2f}; target >= 0.85)"
        )
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
