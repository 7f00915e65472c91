"""Trainer data path on CPU: steps/s of `alphaset train` reading real feature shards against the
same training step on synthetic in-memory batches, in one run. Target: ratio >= 0.95 (loading,
posterior sampling, dropout and bucketing must not stall the step).

The features are real: skimage photos (crops and flips, 48 images in 6 shards) through the
feature stage with the tiny T5 and tiny VAE at 256 px. The model is the `small` DiT preset.
Both sides are timed in windows of 5 steps (the trainer's own log windows). On a shared machine
the load drifts over minutes, so the runs alternate, S T S T S T S (S: synthetic, T: a fresh
trainer run), each T is compared with the S runs on both sides of it (median windows), and the
reported ratio is the median over the rounds.

    .venv/bin/python bench/train.py [--steps 20] [--batch 4] [--workers 1] [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def build_store(root: Path) -> str:
    from PIL import Image, ImageOps
    from skimage import data

    from pipeline.ingest.folder import ingest_folder
    from pipeline.store import Store
    from training.features import extract_features

    photos = root / "photos" / "things"
    photos.mkdir(parents=True)
    names = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "camera")
    n = 0
    for name in names:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        w, h = img.size
        for i in range(8):
            crop = img.crop((i * w // 40, i * h // 40, w - i * w // 50, h - i * h // 60))
            if i % 2:
                crop = ImageOps.mirror(crop)
            crop.save(photos / f"{name}-{i}.jpg", quality=90)
            n += 1
    store = Store(str(root / "store"))
    ingest_folder(store, str(root / "photos"), label_from_dir=True, progress=False, shard_size=8)
    extract_features(
        store,
        256,
        t5="tiny",
        vae="tiny",
        captions="label",
        tag="bench",
        use_ray=False,
        progress=False,
    )
    return store.root


WINDOW = 5


def synthetic_steps_per_s(fset, tconfig, batch: int, steps: int, seed: int = 0) -> list[float]:
    """The trainer's step (same model, loss, AdamW, clipping, EMA) on in-memory batches."""
    import copy

    from training.diffusion import Diffusion
    from training.model import build_transformer

    torch.manual_seed(seed)
    model = build_transformer(tconfig, seed=seed).train()
    ema = copy.deepcopy(model).requires_grad_(False)
    params = list(model.parameters())
    ema_params = list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.03, eps=1e-10)
    diffusion = Diffusion(True)
    h = 256 // fset.vae_downsample
    batches = [
        {
            "latents": torch.randn(batch, fset.latent_channels, h, h),
            "t5": torch.randn(batch, fset.max_length, fset.t5_dim).half(),
            "mask": torch.ones(batch, fset.max_length, dtype=torch.uint8),
        }
        for _ in range(4)
    ]

    def step(i: int) -> None:
        b = batches[i % len(batches)]
        x0, text, mask = b["latents"], b["t5"].float(), b["mask"]
        gen = torch.Generator().manual_seed(i)
        t = diffusion.sample_timesteps(batch, gen, torch.device("cpu"))
        noise = torch.randn(x0.shape, generator=gen)
        x_t = diffusion.add_noise(x0, noise, t)
        out = model(x_t, encoder_hidden_states=text, encoder_attention_mask=mask, timestep=t).sample
        loss = diffusion.loss(out, x0, x_t, t, noise).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.01)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1e-4)
        loss.item()

    for i in range(3):  # warm-up
        step(i)
    rates = []
    for w in range(steps // WINDOW):
        start = time.perf_counter()
        for i in range(WINDOW):
            step(w * WINDOW + i)
        rates.append(WINDOW / (time.perf_counter() - start))
    return rates


def trainer_steps_per_s(
    store: str, out: Path, batch: int, steps: int, workers: int
) -> tuple[list[float], float]:
    """(steps/s of each logged window after the first, mean data-wait fraction) of `train`."""
    from training.config import config_from_dict
    from training.train import train

    warm = WINDOW
    cfg = config_from_dict(
        {
            "run": {"name": "bench", "store": store, "model": "small", "dir": str(out), "num_workers": workers, "log_every": warm, "seed": 0, "mixed_precision": "no"},  # the bare step is fp32
            "stage": [
                {
                    "name": "s", "features": "bench", "resolution": 256, "steps": warm + steps, "batch_size": batch,
                    "lr": 1e-4, "warmup": 1, "save_every": 10_000, "shuffle_buffer": 16, "init_from": "scratch",
                }
            ],
        }
    )  # fmt: skip
    train(cfg, progress=False)  # logs every 5 steps: the first window is the warm-up
    records = [
        json.loads(x) for x in (out / "bench" / "s" / "metrics.jsonl").read_text().splitlines()
    ]
    timed = [r for r in records if r["step"] > warm]
    return [r["img_per_s"] / batch for r in timed], float(np.mean([r["data_wait"] for r in timed]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20, help="timed steps (a multiple of 5)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 avoids oversubscription on a shared CPU)",
    )
    parser.add_argument("--workers", type=int, default=1, help="data-loader processes")
    parser.add_argument(
        "--rounds", type=int, default=3, help="trainer runs, each between two synthetic runs"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("ALPHASET_CACHE", str(Path(tmp) / "cache"))
        root = Path(tmp)
        t0 = time.perf_counter()
        store = build_store(root)
        print(
            f"features: 48 real photos → tiny T5/VAE feature shards in {time.perf_counter() - t0:.1f}s"
        )
        from training.data import open_features
        from training.model import transformer_config

        fset = open_features(store, "bench", resolution=256, multi_scale=False)
        tconfig = transformer_config("small", resolution=256, caption_channels=fset.t5_dim)
        from training.model import build_transformer

        n_params = sum(p.numel() for p in build_transformer(tconfig).parameters())
        print(f"model: small DiT, {n_params / 1e6:.1f}M params, 256 px (latent 32x32), batch {args.batch}, "
              f"{torch.get_num_threads()} torch threads, {args.workers} loader worker(s)")  # fmt: skip
        syn = [np.median(synthetic_steps_per_s(fset, tconfig, args.batch, args.steps))]
        ratios, waits = [], []
        for r in range(args.rounds):
            real, wait = trainer_steps_per_s(
                store, root / f"runs{r}", args.batch, args.steps, args.workers
            )
            syn.append(np.median(synthetic_steps_per_s(fset, tconfig, args.batch, args.steps)))
            ref = (syn[-2] + syn[-1]) / 2
            ratios.append(float(np.median(real)) / ref)
            waits.append(wait)
            print(f"round {r + 1}: synthetic {syn[-2]:.3f} / {syn[-1]:.3f} steps/s, trainer {np.median(real):.3f} "
                  f"steps/s (data wait {wait:.1%}) → ratio {ratios[-1]:.3f}", flush=True)  # fmt: skip
        ratio = float(np.median(ratios))
        print(f"ratio trainer / synthetic (median of {args.rounds} rounds): {ratio:.3f}; "
              f"data wait {np.mean(waits):.1%} (target >= 0.95: {'met' if ratio >= 0.95 else 'NOT met'})")  # fmt: skip


if __name__ == "__main__":
    main()
