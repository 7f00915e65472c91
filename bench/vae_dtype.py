"""Benchmark (CPU or GPU): the VAE's encode speed and latent error in fp32, bf16 and fp16.

    .venv/bin/python bench/vae_dtype.py [--resolution 256] [--images 8] [--batch 4] [--out F.json]

The SD VAE architecture (bench/archs.py, 128-256-512-512, ~34 M encoder parameters) at random
weights, encoding real photos (scikit-image, square crops) with `training.vae.VaeEncoder`, the
feature stage's encoder: [-1, 1] input in the VAE's dtype, [mean, std] out as fp16. For each dtype:
images/s (best of ``--reps``) and the error of the stored latent mean against fp32's
(max |Δ| / max |mean|, and the mean |Δ| relative to the mean |mean|). Random weights give the
arithmetic's rounding, not the trained VAE's exact figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16,fp16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import numpy as np
    import torch
    from archs import SD_VAE
    from diffusers import AutoencoderKL
    from skimage import data

    from training.buckets import resize_cover_crop
    from training.vae import VaeEncoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = ("astronaut", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field")
    from PIL import Image

    photos = []
    for i in range(args.images):
        arr = getattr(data, names[i % len(names)])()
        img = Image.fromarray(arr).convert("RGB")
        photos.append(np.asarray(resize_cover_crop(img, args.resolution, args.resolution)))
    x = np.stack(photos)  # (N, H, W, 3) uint8
    torch.manual_seed(0)
    base = AutoencoderKL(**SD_VAE).eval().requires_grad_(False)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    results = {
        "device": torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu x{torch.get_num_threads()}",
        "torch": torch.__version__,
        "resolution": args.resolution,
        "images": args.images,
        "batch": args.batch,
        "by_dtype": {},
    }
    ref = None
    for name in args.dtypes.split(","):
        enc = VaeEncoder(AutoencoderKL(**SD_VAE).to(device, dtypes[name]).eval())
        enc.vae.load_state_dict(base.state_dict())  # the same weights, cast to this dtype
        enc.encode(x[: args.batch])  # warm-up
        best = float("inf")
        for _ in range(args.reps):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = np.concatenate(
                [enc.encode(x[i : i + args.batch]) for i in range(0, len(x), args.batch)]
            )
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
        mean = out[:, 0].astype(np.float32)
        r = {"img_per_s": round(len(x) / best, 2), "seconds": round(best, 3)}
        if ref is None:
            ref = mean
        else:
            d = np.abs(mean - ref)
            r["max_err_rel"] = float(f"{d.max() / np.abs(ref).max():.3g}")
            r["mean_err_rel"] = float(f"{d.mean() / np.abs(ref).mean():.3g}")
        results["by_dtype"][name] = r
        print(name, r, flush=True)
    fp32 = results["by_dtype"].get("fp32", {}).get("img_per_s")
    for r in results["by_dtype"].values():
        if fp32:
            r["speed_vs_fp32"] = round(r["img_per_s"] / fp32, 2)
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
