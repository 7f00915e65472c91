"""Step time of each training objective in the one loop (LCM, ControlNet, DreamBooth) against the
bare diffusers step of the same work, in one run, at PixArt-XL-2 size in bf16.

For each objective the trainer (`training.train.train` on a one-stage config: loader, autocast,
grad clipping, EMA, metrics) runs on random feature shards; its img/s comes from metrics.jsonl
windows after the first. The bare step is plain torch on random device tensors doing the same
model work with fused AdamW and nothing else: LCM = student forward+backward, teacher forward on
2B (CFG), target forward, target EMA; ControlNet = ControlNetTransformer forward+backward (13
copied blocks); DreamBooth = a diffusion step on B instance + B prior latents. Target (issue 14):
trainer / bare >= 0.9 for each. The plain diffusion trainer is bench/gpu_train.py's figure.

The base is a random-weight PixArt-XL-2 saved as a training checkpoint folder (state.json +
ema.safetensors); ControlNet's edges are random PNGs in an edges/<tag> stage (encoded once by the
tiny VAE: the cache makes their cost vanish after the first epoch); DreamBooth's cached inputs
(dreambooth_inputs.safetensors) are written up front, as a resumed run finds them.

    python bench/gpu_objectives.py --out o.json     # GPU, ~3-4 min
    python bench/gpu_objectives.py --tiny           # CPU smoke test (tiny preset)
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_train import free, timed, write_random_features  # noqa: E402

TAG = "random256"


def write_base(root: str, preset: str, tconfig: dict, model: torch.nn.Module, t5_dim: int) -> str:
    """A training checkpoint folder holding ``model`` (what the objectives start from)."""
    from safetensors.torch import save_file

    from training import checkpoint as ck

    folder = os.path.join(root, "base", "checkpoints", "step-1")
    os.makedirs(folder)
    sd = {
        k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()
    }
    save_file(sd, os.path.join(folder, ck.EMA_FILE))
    save_file(sd, os.path.join(folder, ck.MODEL_FILE))
    settings = {"t5": "tiny", "vae": "tiny", "t5_dim": t5_dim, "resolution": 256,
                "multi_scale": False, "max_length": 120, "vae_scale_factor": 0.18215}  # fmt: skip
    state = {"step": 1, "stage": "base", "transformer_config": tconfig,
             "config": {"model": preset, "learned_sigma": True},
             "features": {"store": root, "tag": TAG, "view": None, "settings": settings}}  # fmt: skip
    ck.write_json(os.path.join(folder, ck.STATE_FILE), state)
    return folder


def write_random_edges(store_root: str, tag: str) -> None:
    """edges/<tag>: one random 256 px edge PNG per feature key."""
    import pyarrow as pa
    from PIL import Image

    from pipeline import fs
    from pipeline.store import Store

    store = Store(store_root)
    feats = store.completed(f"features/{TAG}")
    stage = f"edges/{tag}"
    store.claim_stage(stage, {"hed": "random", "resolution": 256})
    rng = np.random.default_rng(0)
    for shard in sorted(feats):
        from training.data import read_shard

        keys = [
            s["__key__"]
            for s in read_shard(fs.join(store.stage_dir(f"features/{TAG}"), f"{shard}.tar"))
        ]
        pngs = []
        for _ in keys:
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)).save(buf, "PNG")
            pngs.append(buf.getvalue())
        table = pa.table({"key": keys, "edges": pa.array(pngs, pa.binary()),
                          "height": [256] * len(keys), "width": [256] * len(keys),
                          "error": pa.array([None] * len(keys), pa.string())})  # fmt: skip
        checksum = fs.write_parquet(store.url("edges", tag, f"{shard}.parquet"), table)
        store.write_status(stage, shard, {"rows": len(keys), "ok": len(keys), "errors": 0,
                                          "errors_by_reason": {}, "checksum": checksum,
                                          "output": f"{shard}.parquet"})  # fmt: skip


def write_dreambooth_cache(cfg, t5_dim: int, lat: int, n: int) -> None:  # noqa: ANN001
    """The DreamBooth stage's input cache (random), with the fingerprint the stage checks."""
    from safetensors.torch import save_file

    from training.dreambooth import INPUTS_FILE, DreamBoothObjective
    from training.train import stage_dir

    stage = cfg.stages[0]
    obj = DreamBoothObjective.__new__(DreamBoothObjective)
    obj.cfg, obj.stage = cfg, stage
    fingerprint = obj._fingerprint(stage.init_from)
    g = torch.Generator().manual_seed(0)
    t5 = torch.randn(1, 120, t5_dim, generator=g).half()
    mask = torch.ones(1, 120, dtype=torch.uint8)
    out = {
        "instance": torch.randn(n, 4, lat, lat, generator=g),
        "prior": torch.randn(n, 4, lat, lat, generator=g),
    }
    for name in ("instance", "class", "null"):
        out[f"{name}_t5"], out[f"{name}_mask"] = t5[0].clone(), mask[0].clone()
    sdir = stage_dir(cfg, stage)
    os.makedirs(sdir, exist_ok=True)
    save_file(out, os.path.join(sdir, INPUTS_FILE), metadata={"fingerprint": fingerprint})


def trainer_img_per_s(cfg) -> tuple[float, float]:  # noqa: ANN001
    from training.train import stage_dir, train

    train(cfg, progress=True)
    recs = [
        json.loads(x)
        for x in (Path(stage_dir(cfg, cfg.stages[0])) / "metrics.jsonl").read_text().splitlines()
    ]
    timed = recs[1:] or recs  # the first window holds warm-up
    return float(np.mean([r["img_per_s"] for r in timed])), float(
        np.mean([r["data_wait"] for r in timed])
    )


def bare_img_per_s(kind: str, model: torch.nn.Module, tconfig: dict, batch: int, steps: int,
                   warmup: int, device: torch.device, blocks: int) -> float:  # fmt: skip
    """The same model work as the objective's step in plain torch (see the module docstring)."""
    from training.controlnet import ControlNetTransformer

    cuda = device.type == "cuda"
    lat, dim = tconfig["sample_size"], tconfig["caption_channels"]
    n = 2 * batch if kind == "dreambooth" else batch
    if kind == "controlnet":
        net = ControlNetTransformer(copy.deepcopy(model), blocks).to(device).train()
    else:
        net = copy.deepcopy(model).to(device).train().requires_grad_(True)
    teacher = (
        copy.deepcopy(model).to(device).eval().requires_grad_(False) if kind == "lcm" else None
    )
    target = copy.deepcopy(model).to(device).eval().requires_grad_(False) if kind == "lcm" else None
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=cuda)
    x = torch.randn(n, 4, lat, lat, device=device)
    text = torch.randn(n, 120, dim, device=device)
    mask = torch.ones(n, 120, device=device)
    t = torch.randint(0, 1000, (n,), device=device)
    ctrl = torch.randn(n, 4, lat, lat, device=device) if kind == "controlnet" else None
    kw = {"encoder_hidden_states": text, "encoder_attention_mask": mask, "timestep": t}
    ema_t = [p for p in target.parameters()] if target is not None else []

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=True):
            if kind == "controlnet":
                out = net(x, control=ctrl, **kw).sample
            else:
                out = net(x, **kw).sample
            if kind == "lcm":
                with torch.no_grad():
                    two = {"encoder_hidden_states": torch.cat([text, text]), "timestep": torch.cat([t, t]),
                           "encoder_attention_mask": torch.cat([mask, mask])}  # fmt: skip
                    teacher(torch.cat([x, x]), **two)
                    target(x, **kw)
        loss = out.float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema_t:
            with torch.no_grad():
                torch._foreach_lerp_(ema_t, list(net.parameters()), 0.05)

    return n * steps / timed(step, warmup, steps, device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test with the tiny preset")
    parser.add_argument("--only", default="lcm,controlnet,dreambooth", help="objectives to measure")
    parser.add_argument("--out", default=None, help="write the JSON summary here too")
    args = parser.parse_args()
    from training.model import build_transformer, transformer_config
    from training.recipes import controlnet_config, dreambooth_config, lcm_config

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:
        preset, t5_dim, batch, steps, warmup, trainer_steps, log_every, blocks = (
            "tiny",
            64,
            2,
            3,
            1,
            6,
            2,
            1,
        )
    else:
        if device.type != "cuda":
            raise SystemExit("no CUDA device: run with --tiny for the CPU smoke test")
        preset, t5_dim, batch, steps, warmup, trainer_steps, log_every, blocks = (
            "pixart-xl-2",
            4096,
            16,
            10,
            3,
            40,
            10,
            13,
        )
    tconfig = transformer_config(preset, resolution=256, caption_channels=t5_dim)
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "preset": preset, "batch": batch, "bf16": True}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("ALPHASET_CACHE", os.path.join(tmp, "cache"))
        store = os.path.join(tmp, "store")
        # the tiny VAE encodes the edge maps (no weights needed; cached after the first epoch)
        write_random_features(store, TAG, 256, t5_dim, 4, max(4 * batch, 16), vae="tiny")
        write_random_edges(store, "edges256")
        model = build_transformer(tconfig, seed=0)
        base = write_base(tmp, preset, tconfig, model, t5_dim)
        run = {"num_workers": 2, "log_every": log_every, "bf16": True}
        for kind in args.only.split(","):
            out = os.path.join(tmp, "runs", kind)
            if kind == "lcm":
                cfg = lcm_config(
                    base, store, TAG, out, steps=trainer_steps, batch_size=batch, lr=1e-5, **run
                )
            elif kind == "controlnet":
                cfg = controlnet_config(store, base, TAG, "edges256", out, blocks=blocks,
                                        steps=trainer_steps, batch_size=batch, lr=1e-5, **run)  # fmt: skip
            elif kind == "dreambooth":
                photos = os.path.join(tmp, "photos")
                os.makedirs(photos, exist_ok=True)
                from PIL import Image

                Image.new("RGB", (64, 64), (120, 80, 40)).save(os.path.join(photos, "a.png"))
                cfg = dreambooth_config(base, photos, "a photo of sks thing", out, class_prompt="a thing",
                                        prior_images=4, steps=trainer_steps, batch_size=batch, lr=1e-5, **run)  # fmt: skip
                write_dreambooth_cache(cfg, t5_dim, tconfig["sample_size"], 4)
            else:
                raise SystemExit(f"unknown objective {kind}")
            cfg.stages[0].save_every = 1_000_000  # no checkpoint inside the timed steps
            cfg.stages[0].steps = trainer_steps
            img_s, wait = trainer_img_per_s(cfg)
            free(device)
            bare = bare_img_per_s(kind, model, tconfig, batch, steps, warmup, device, blocks)
            free(device)
            results[kind] = {"trainer_img_s": img_s, "bare_img_s": bare, "ratio": img_s / bare,
                             "data_wait": wait, "target": 0.9}  # fmt: skip
            print(f"{kind}: trainer {img_s:.1f} img/s, bare {bare:.1f} img/s, ratio {img_s / bare:.2f} "
                  f"(data wait {wait:.1%})", flush=True)  # fmt: skip
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
