"""PixArt-XL-2 training throughput on one GPU, in one run: the bare diffusers training step (eager
and torch.compile) against `alphaset train` (loader from feature shards on local disk, EMA,
TensorBoard logging), plus the bare eager step at 512 px.

Anchors (issue 6, H200, bf16): bare step 321 img/s eager, 428 img/s compiled at 256 px batch 64;
75 img/s eager at 512 px batch 16. Target: trainer >= 0.95 of the bare compiled step measured here.

Feature shards are written in the real format (T5 120 x 4096 fp16, mask, VAE mean/std fp16, JSON)
with random values, to a local temp folder; no model weights or network are needed. `--tiny` runs
the same measurements with the `tiny` preset on CPU (a smoke test of this script).

    python bench/gpu_train.py                 # GPU: ~5-8 min, prints a JSON summary
    python bench/gpu_train.py --tiny          # CPU smoke test
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_random_features(
    root: str,
    tag: str,
    resolution: int,
    t5_dim: int,
    shards: int,
    per_shard: int,
    vae: str = "sd-vae-ft-ema",
) -> None:
    """A store whose features/<tag> has the feature stage's format, filled with random values."""
    from pipeline import fs
    from pipeline.store import Store, write_tar

    store = Store(root)
    store.create()
    stage = f"features/{tag}"
    rng = np.random.default_rng(0)
    L, lat = 120, resolution // 8
    settings = {
        "t5": "t5-v1_1-xxl", "vae": vae, "t5_dim": t5_dim, "resolution": resolution,
        "multi_scale": False, "captions": "random", "view": None, "max_length": L, "vae_scale_factor": 0.18215,
    }  # fmt: skip
    store.claim_stage(stage, settings)
    null = io.BytesIO()
    np.savez(null, t5=np.zeros((L, t5_dim), np.float16), mask=np.eye(1, L, dtype=np.uint8)[0])
    fs.atomic_write(fs.join(store.stage_dir(stage), "_null.npz"), null.getvalue())
    for s in range(shards):
        shard = f"{s:06d}"
        samples = []
        for i in range(per_shard):
            key = f"k{s:04d}{i:05d}"
            n = int(rng.integers(5, L))
            t5 = np.zeros((L, t5_dim), np.float16)
            t5[:n] = rng.standard_normal((n, t5_dim), dtype=np.float32)
            mask = (np.arange(L) < n).astype(np.uint8)
            vae = np.stack(
                [
                    rng.standard_normal((4, lat, lat), dtype=np.float32) * 5,
                    np.full((4, lat, lat), 0.05),
                ]
            )
            meta = {"key": key, "bucket": [resolution, resolution], "resolution": resolution, "caption": "random",
                    "text_truncated": False, "n_tokens": n, "orig_width": resolution, "orig_height": resolution,
                    "error": None}  # fmt: skip
            files = {
                "t5.npy": npy(t5),
                "mask.npy": npy(mask),
                "vae.npy": npy(vae.astype(np.float16)),
                "json": json.dumps(meta).encode(),
            }
            samples.append((key, files))
        url = fs.join(store.stage_dir(stage), f"{shard}.tar")
        digest = write_tar(url, samples)
        store.write_status(stage, shard, {"rows": per_shard, "ok": per_shard, "errors": 0, "errors_by_reason": {},
                                          "checksum": digest, "output": f"{shard}.tar", "settings": settings})  # fmt: skip


def bare_img_per_s(
    tconfig: dict, batch: int, steps: int, warmup: int, device: torch.device, compile: bool
) -> float:
    """diffusers' PixArtTransformer2DModel training step on random GPU tensors: forward, loss,
    backward, fused AdamW; bf16 autocast on CUDA."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(**tconfig).to(device).train()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.03, eps=1e-10, fused=cuda)
    fwd = torch.compile(model) if compile else model
    lat = tconfig["sample_size"]
    x = torch.randn(batch, 4, lat, lat, device=device)
    text = torch.randn(batch, 120, tconfig["caption_channels"], device=device)
    mask = torch.ones(batch, 120, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    target = torch.randn(batch, tconfig["out_channels"], lat, lat, device=device)
    added = None
    if tconfig["use_additional_conditions"]:
        added = {
            "resolution": torch.full((batch, 2), 256.0, device=device),
            "aspect_ratio": torch.ones(batch, 1, device=device),
        }
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if cuda
        else torch.autocast("cpu", enabled=False)
    )

    def step() -> None:
        with autocast:
            out = fwd(
                x,
                encoder_hidden_states=text,
                encoder_attention_mask=mask,
                timestep=t,
                added_cond_kwargs=added,
            ).sample
        loss = (out.float() - target).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch * steps / timed(step, warmup, steps, device)


def trainer_img_per_s(store: str, tag: str, out: str, preset: str, resolution: int, batch: int, steps: int,
                      log_every: int, workers: int, compile: bool) -> tuple[float, float]:  # fmt: skip
    """(img/s, data-wait fraction) of `alphaset train` over its logged windows after the first."""
    from training.config import config_from_dict
    from training.train import train

    cfg = config_from_dict(
        {
            "run": {"name": "bench", "store": store, "model": preset, "dir": out, "num_workers": workers,
                    "log_every": log_every, "compile": compile, "mixed_precision": "bf16", "seed": 0},
            "stage": [{"name": "s", "features": tag, "resolution": resolution, "steps": steps, "batch_size": batch,
                       "warmup": 10, "save_every": 1_000_000, "shuffle_buffer": 64, "init_from": "scratch"}],
        }
    )  # fmt: skip
    train(cfg, progress=True)
    recs = [
        json.loads(x)
        for x in (Path(out) / "bench" / "s" / "metrics.jsonl").read_text().splitlines()
    ]
    timed = recs[1:]  # the first window holds compilation / warm-up
    return float(np.mean([r["img_per_s"] for r in timed])), float(
        np.mean([r["data_wait"] for r in timed])
    )


def timed(step, warmup: int, steps: int, device: torch.device) -> float:
    """Seconds that ``steps`` calls of ``step`` take after ``warmup`` untimed ones (synced)."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with the tiny preset")
    parser.add_argument(
        "--workers", type=int, default=8, help="data-loader processes for the trainer"
    )
    parser.add_argument("--out", default=None, help="write the JSON summary here too")
    args = parser.parse_args()
    from training.model import transformer_config

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        preset, t5_dim, batch, batch512 = "tiny", 64, 4, 2
        steps, warmup, trainer_steps, log_every, shards, per_shard, workers = 4, 1, 12, 4, 4, 16, 1
    else:
        if device.type != "cuda":
            raise SystemExit("no CUDA device: run with --tiny for the CPU smoke test")
        preset, t5_dim, batch, batch512 = "pixart-xl-2", 4096, 64, 16
        steps, warmup, trainer_steps, log_every, shards, per_shard, workers = (
            30,
            5,
            100,
            20,
            16,
            64,
            args.workers,
        )
    cfg256 = transformer_config(preset, resolution=256, caption_channels=t5_dim)
    cfg512 = transformer_config(preset, resolution=512, caption_channels=t5_dim)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "preset": preset}  # fmt: skip
    import diffusers

    results["diffusers"] = diffusers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("ALPHASET_CACHE", os.path.join(tmp, "cache"))
        t0 = time.perf_counter()
        write_random_features(
            os.path.join(tmp, "store"), "random256", 256, t5_dim, shards, per_shard
        )
        results["write_features_s"] = round(time.perf_counter() - t0, 1)
        print(
            f"wrote {shards * per_shard} random feature samples in {results['write_features_s']}s",
            flush=True,
        )

        results["bare_eager_256_img_s"] = bare_img_per_s(
            cfg256, batch, steps, warmup, device, compile=False
        )
        print(
            f"bare eager    256 px batch {batch}: {results['bare_eager_256_img_s']:.1f} img/s",
            flush=True,
        )
        results["bare_compiled_256_img_s"] = bare_img_per_s(
            cfg256, batch, steps, warmup + 3, device, compile=True
        )
        print(
            f"bare compiled 256 px batch {batch}: {results['bare_compiled_256_img_s']:.1f} img/s",
            flush=True,
        )
        img_s, wait = trainer_img_per_s(os.path.join(tmp, "store"), "random256", os.path.join(tmp, "runs"), preset,
                                        256, batch, trainer_steps, log_every, workers, compile=True)  # fmt: skip
        results["trainer_compiled_256_img_s"], results["trainer_data_wait"] = img_s, wait
        free(device)
        print(
            f"trainer (compiled, loader, EMA, logging): {img_s:.1f} img/s, data wait {wait:.1%}",
            flush=True,
        )
        results["bare_eager_512_img_s"] = bare_img_per_s(
            cfg512, batch512, steps, warmup, device, compile=False
        )
        print(
            f"bare eager    512 px batch {batch512}: {results['bare_eager_512_img_s']:.1f} img/s",
            flush=True,
        )
    results["ratio_trainer_vs_bare_compiled"] = (
        results["trainer_compiled_256_img_s"] / results["bare_compiled_256_img_s"]
    )
    results["compile_speedup"] = (
        results["bare_compiled_256_img_s"] / results["bare_eager_256_img_s"]
    )
    print(json.dumps(results, indent=1))
    ok = results["ratio_trainer_vs_bare_compiled"] >= 0.95
    print(
        f"trainer / bare compiled = {results['ratio_trainer_vs_bare_compiled']:.3f} (target >= 0.95: {'met' if ok else 'NOT met'})"
    )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
