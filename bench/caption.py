"""Benchmark (CPU): the `alphaset caption` stage against the bare model's batched `generate` on the
same preprocessed inputs, in the same run. Target: stage >= 0.85x the bare model's images/s.

The model is a ~60M-parameter random-weight LLaVA (`captioning.models.ARCHS["bench-cpu"]`: CLIP
tower 224px/32, Llama text 8 layers x 512, vocabulary 32064) saved to a folder and loaded back with
`from_pretrained`. Output length is fixed (min_new_tokens = max_new_tokens) so both sides do the
same work. The bare side is `model.generate` alone on batches decoded, resized and tokenized
beforehand (not timed). The stage side is `captioning.worker.CaptionWorker` called on every shard,
as a Ray actor runs it: tar read, JPEG decode and preprocessing on the prefetch thread, generate,
caption post-processing, the Parquet file and the status record. Model loading is outside both
timings; both sides use --threads torch threads (default 1, as in a Ray actor given 1 CPU, where
OMP_NUM_THREADS=1); a warm-up comes first and the two alternate for --rounds rounds (the machine is shared:
the best round of each is the least disturbed one). ``--ray`` also runs the whole stage through
`caption_store` on a local Ray and prints its end-to-end figures (Ray start and model load included).

    .venv/bin/python bench/caption.py --n 64 --batch-size 8 --tokens 16 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from photos import photo_store  # noqa: E402  (bench/photos.py)

from captioning.captioner import CaptionConfig, Captioner  # noqa: E402
from captioning.models import ARCHS, save_llava  # noqa: E402
from captioning.worker import CaptionWorker  # noqa: E402
from pipeline import images  # noqa: E402
from pipeline.store import Store  # noqa: E402


def bare_inputs(store: Store, captioner: Captioner) -> list:
    """Every image decoded, resized and tokenized into batches, as the stage would (not timed)."""
    imgs = []
    for shard in store.shards():
        for _key, _ext, data in store.iter_images(shard):
            imgs.append(images.decode(data, max_side=captioner.config.max_side)[0])
    bs = captioner.config.batch_size
    return [captioner.prepare(imgs[i : i + bs]).inputs for i in range(0, len(imgs), bs)]


def run_bare(model, batches: list, gen: dict) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for inputs in batches:
            model.generate(**inputs, **gen)
    return time.perf_counter() - t0


def run_stage(worker: CaptionWorker, shards: list[str]) -> float:
    t0 = time.perf_counter()
    for shard in shards:
        worker(shard)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=64, help="images (default 64)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--tokens", type=int, default=16, help="new tokens per caption, fixed (default 16)"
    )
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument(
        "--sort-window", type=int, default=8, help="the stage's length-sorting window (batches)"
    )
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch threads on both sides (default 1: what a Ray actor with 1 CPU gets)",
    )  # fmt: skip
    ap.add_argument(
        "--ray", action="store_true", help="also run caption_store end to end on a local Ray"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    work = Path(tempfile.mkdtemp(prefix="bench-caption-"))
    try:
        # 1. Data: real photos in a store; the model: random weights saved as a folder.
        store = photo_store(work, args.n, args.shard_size)
        model_dir = work / "model"
        save_llava(ARCHS["bench-cpu"], str(model_dir))
        cfg = CaptionConfig(
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            batch_size=args.batch_size,
            sort_window=args.sort_window,
        )
        captioner = Captioner.load(str(model_dir), cfg)
        model = captioner.model
        params = sum(p.numel() for p in model.parameters())
        worker = CaptionWorker.from_captioner(store.root, captioner, "bench", "bench-cpu")
        shards = store.shards()
        n = sum(len(store.ok_keys(s)) for s in shards)
        # 2. The bare side's inputs, prepared once; the same generation settings as the stage.
        batches = bare_inputs(store, captioner)
        gen = dict(
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            do_sample=False,
            pad_token_id=captioner.pad_id,
        )
        # 3. Warm-up, then alternate.
        run_bare(model, batches[:1], gen)
        worker(shards[0])
        bare, stage = [], []
        for _ in range(args.rounds):
            bare.append(n / run_bare(model, batches, gen))
            stage.append(n / run_stage(worker, shards))
        result = {
            "bench": "caption",
            "device": "cpu",
            "torch_threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(),
            "params_m": round(params / 1e6, 1),
            "images": n,
            "shards": len(shards),
            "batch_size": args.batch_size,
            "new_tokens": args.tokens,
            "sort_window": args.sort_window,
            "bare_img_s": [round(x, 2) for x in bare],
            "stage_img_s": [round(x, 2) for x in stage],
            "ratio_best": round(max(stage) / max(bare), 3),
            "ratio_median": round(statistics.median(stage) / statistics.median(bare), 3),
        }
        if args.ray:
            result.update(ray_end_to_end(store, str(model_dir), args))
        print(json.dumps(result, indent=1))
        print(
            f"caption stage {max(stage):.2f} img/s vs bare generate {max(bare):.2f} img/s "
            f"= {result['ratio_best']:.3f}x (target >= 0.85); {params / 1e6:.0f}M params, "
            f"batch {args.batch_size}, {args.tokens} tokens, {n} images"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ray_end_to_end(store: Store, model_dir: str, args: argparse.Namespace) -> dict:
    """`caption_store` through a local Ray (one actor with every CPU): wall time and shard time."""
    from captioning.run import caption_store

    t0 = time.perf_counter()
    summary = caption_store(
        store.root, model_dir, tag="bench-ray", batch_size=args.batch_size, max_new_tokens=args.tokens,
        min_new_tokens=args.tokens, cpus_per_worker=float(torch.get_num_threads()), progress=False,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    assert summary.ok, summary.lines()
    shard_s = sum(r["seconds"] for r in store.completed("captions/bench-ray").values())
    return {
        "ray_wall_s": round(wall, 1),
        "ray_img_s_end_to_end": round(summary.rows / wall, 2),
        "ray_img_s_in_shards": round(summary.rows / shard_s, 2),
    }


if __name__ == "__main__":
    main()
