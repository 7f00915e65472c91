"""Benchmark (GPU): the feature stage against bare T5-XXL and SD-VAE, real sizes, same run.

    python bench/gpu_features.py [--out results.json]        # CUDA, bf16, real-size models
    python bench/gpu_features.py --tiny                      # CPU smoke run of the same code

Models are the real architectures at random weights, built in GPU memory (no download, no disk):
the T5 v1.1 XXL encoder (d_model 4096, 24 layers, 64 heads, d_kv 64, d_ff 10240, gated-gelu;
~4.7 B parameters, ~9.5 GB in bf16) and the SD VAE (128-256-512-512, 2 layers per block).
The tokenizer is the tiny in-process Unigram one (token ids < 32128; captions of 15-45 words
come out at ~60-120+ tokens, many truncated at 120 — about what LLaVA captions give with T5's).

For each resolution (256, 512, 1024 px: 1024, 512, 256 images; square crops from ~1.3k px JPEGs):
  bare   T5 forward at batch 128 on pre-tokenised captions — both PixArt's padded-to-120 and the
         stage's sorted-by-length batching; the faster is used — + VAE encode of the same crops
         already on the GPU; outputs to host as fp16.
  stage  `FeatureWorker.from_models` (the stage worker, no Ray) on the shards: read, clean,
         tokenise, decode/crop in threads, both models, stream the WebDataset shard, status.
``--vae-dtype`` (default fp32, the stage's default) is the VAE's dtype in both; the bare VAE is also
timed in the other two dtypes (``bare_vae_img_per_s_by_dtype``): the speed cost of fp32.
ratio = (bare T5 + bare VAE) / stage, per rep (measured side by side), best of ``--reps`` (the
first rep still pays one-off costs); target >= 0.9. Shards hold 256 images (the production
default is 1000: the per-shard tail — last samples, fsync — weighs more here, so this errs low).
Anchors from the issue (H200, bf16): T5-XXL 328 captions/s at batch 128; VAE 736 img/s at 256 px, 178 at 512, 33 at 1024.
Needs torch, transformers, diffusers, pyarrow, fsspec, pillow, scikit-image; not Ray.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/features.py: shared helpers

from archs import SD_VAE, T5_XXL, TINY_T5, TINY_VAE  # noqa: E402  (bench/archs.py)
from features import (  # noqa: E402
    bare_t5,
    bare_vae,
    make_photos,
    make_store,
    run_stage_worker,
    shard_texts_and_crops,
)

ANCHORS = {"t5_captions_per_s": 328, "vae_img_per_s": {256: 736, 512: 178, 1024: 33}}


def build_models(
    tiny: bool, device: str, dtype: Any, tok_dir: Path, vae_dtype: Any
) -> tuple[Any, Any, Any]:
    import torch
    from diffusers import AutoencoderKL
    from transformers import T5Config, T5EncoderModel

    from training.feature_models import _dtype_kwarg, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(str(tok_dir))
    torch.manual_seed(0)
    with torch.device(device):  # weights are created (and initialised) on the GPU
        t5 = T5EncoderModel._from_config(
            T5Config(**(TINY_T5 if tiny else T5_XXL)), **_dtype_kwarg(dtype)
        )
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE)).to(vae_dtype)
    return t5.eval().requires_grad_(False), tokenizer, vae.eval().requires_grad_(False)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--tiny", action="store_true", help="tiny models on CPU: a smoke run of this script"
    )
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--shard-size", type=int, default=256)
    ap.add_argument("--out", default=None, help="write the figures as JSON here too")
    ap.add_argument("--vae-dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    args = ap.parse_args()

    import torch

    from pipeline.store import Store
    from training.features import FeatureSettings, FeatureWorker
    from training.text import TextEncoder
    from training.vae import VaeEncoder

    if args.tiny:
        device, dtype = "cpu", torch.float32
        plan = {256: (16, 8), 512: (8, 4), 1024: (4, 2)}  # resolution → (images, VAE batch)
        shard_size, long_side, text_batch = 4, 640, 16
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA device: run with --tiny for the CPU smoke run")
        device, dtype = "cuda", torch.bfloat16
        plan = {256: (1024, 64), 512: (512, 32), 1024: (256, 8)}
        shard_size, long_side, text_batch = args.shard_size, 1300, 128
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    work = Path(tempfile.mkdtemp(prefix="bench-gpu-features-"))
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).replace("torch.", ""),
        "vae_dtype": args.vae_dtype,
        "tiny": args.tiny,
        "anchors_h200": ANCHORS,
        "by_resolution": {},
    }
    try:
        # 1. Data: one store, shards of `shard_size`; each resolution uses the first shards.
        t = time.perf_counter()
        n_max = max(n for n, _ in plan.values())
        make_photos(work / "photos", n_max, long_side=long_side, words=(15, 45))
        store = make_store(work / "store", work / "photos", shard_size)
        shards = Store(store).shards()
        results["data_s"] = round(time.perf_counter() - t, 1)

        # 2. Models, in memory.
        t = time.perf_counter()
        dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
        t5, tokenizer, vae = build_models(
            args.tiny, device, dtype, work / "tokenizer", dtypes[args.vae_dtype]
        )
        text = TextEncoder(t5, tokenizer, max_length=120, batch_size=text_batch)
        vae_enc = VaeEncoder(vae)
        results["models_s"] = round(time.perf_counter() - t, 1)
        results["t5_params_b"] = round(sum(p.numel() for p in t5.parameters()) / 1e9, 3)

        # 3. Per resolution: bare models, then the stage worker, alternating for --reps.
        for res, (n, batch) in plan.items():
            use = shards[: max(1, n // shard_size)]
            texts, crops = shard_texts_and_crops(store, use, res)
            n_img = len(texts)
            counts = [
                len(x) for x in tokenizer(texts, truncation=True, max_length=120)["input_ids"]
            ]
            settings = FeatureSettings(
                resolution=res, captions="alt", batch_size=batch, text_batch_size=text_batch,
                vae_dtype=args.vae_dtype,
            )  # fmt: skip
            worker = FeatureWorker.from_models(
                store, f"features/warm{res}", text, vae_enc, settings
            )
            worker(use[0])  # warm-up: kernels for these shapes, thread pools, pinned memory
            bare_vae(vae, {k: v[:batch] for k, v in crops.items()}, batch)
            t5_sorted, t5_padded, vae_s, stage_s, ratios = [], [], [], [], []
            records: list[dict] = []
            for rep in range(args.reps):  # bare and stage side by side; each rep its own ratio
                t5_sorted.append(bare_t5(t5, tokenizer, texts, text_batch, 120, padded=False))
                t5_padded.append(bare_t5(t5, tokenizer, texts, text_batch, 120, padded=True))
                vae_s.append(bare_vae(vae, crops, batch))
                worker.stage = f"features/bench{res}-{rep}"
                secs, records = run_stage_worker(worker, use)
                stage_s.append(secs)
                shutil.rmtree(Path(store) / "features" / f"bench{res}-{rep}", ignore_errors=True)
                ratios.append((min(t5_sorted[-1], t5_padded[-1]) + vae_s[-1]) / secs)
            best = max(range(args.reps), key=lambda i: ratios[i])
            by_dtype = {args.vae_dtype: round(n_img / min(vae_s), 1)}
            for name in (d for d in dtypes if d != args.vae_dtype):  # same weights, cast
                other = copy.deepcopy(vae).to(dtypes[name])
                bare_vae(other, {k: v[:batch] for k, v in crops.items()}, batch)  # warm-up
                by_dtype[name] = round(n_img / bare_vae(other, crops, batch), 1)
                del other
            results["by_resolution"][res] = r = {
                "images": n_img,
                "shards": len(use),
                "vae_batch": batch,
                "mean_tokens": round(sum(counts) / len(counts), 1),
                "truncated": sum(rec["truncated"] for rec in records),
                "stage_errors": sum(rec["errors"] for rec in records),
                "bare_t5_padded120_captions_per_s": round(n_img / min(t5_padded), 1),
                "bare_t5_sorted_captions_per_s": round(n_img / min(t5_sorted), 1),
                "bare_vae_img_per_s": round(n_img / min(vae_s), 1),
                "bare_vae_img_per_s_by_dtype": by_dtype,
                "stage_img_per_s": round(n_img / min(stage_s), 1),
                "stage_s_by_rep": [round(x, 3) for x in stage_s],
                "ratio_by_rep": [round(x, 3) for x in ratios],
                "ratio": round(ratios[best], 3),
            }
            print(
                f"{res}px: {n_img} images  bare T5 {r['bare_t5_padded120_captions_per_s']} cap/s (padded 120), "
                f"{r['bare_t5_sorted_captions_per_s']} (sorted)  bare VAE {r['bare_vae_img_per_s']} img/s  "
                f"stage {r['stage_img_per_s']} img/s  ratio {r['ratio']} (target >= 0.9)",
                flush=True,
            )
        if device == "cuda":
            results["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 1)
        print(json.dumps(results, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
