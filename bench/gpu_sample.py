"""Benchmark (GPU): `alphaset sample` at 1024 px with PixArt-XL-2's architecture, same run.

    python bench/gpu_sample.py [--reps 5] [--compile] [--out results.json]   # CUDA, bf16
    python bench/gpu_sample.py --tiny                                        # CPU smoke run

Models are the real architectures at random weights, built in GPU memory (no download, no disk):
PixArt-XL-2-1024-MS's transformer (28 layers, 16 heads x 72, patch 2, caption 4096, sample_size
128, 8 output channels, micro-conditions), the T5 v1.1 XXL encoder (d_model 4096, 24 layers, 64
heads, d_kv 64, d_ff 10240, gated-gelu; ~9.5 GB in bf16) and the SD VAE. The tokenizer is the tiny
Unigram one (ids < 32128; prompts are padded to 120 tokens either way, so T5's cost is real).

What is measured, with `training.sample.generate` (the code `alphaset sample` runs), 1024x1024,
batch 1, bf16, after one warm-up, torch.cuda.synchronize, mean of --reps:
  dpm    DPM-Solver++ 20 steps, cfg 4.5 (the DiT runs at batch 2)  — seconds per image
  lcm    LCM 4 steps, cfg 1                                          — seconds per image
  parts  the bare models on the same work: T5 forward, DiT forwards x steps, VAE decode;
         ratio = parts / end-to-end (what the pipeline and scheduler add; target >= 0.9)
  peak   torch.cuda.max_memory_allocated of a normal run vs a --low-vram run (T5 streamed layer
         by layer and freed, DiT, tiled VAE); target < 8 GB for low-vram.
Options measured when asked: --fuse-qkv (one QKV matmul per self-attention), --channels-last (VAE
decode), --compile (torch.compile of the transformer; compile time reported separately).
Attention is diffusers' default SDPA processor (flash / memory-efficient kernels).
Anchors: PixArt-delta, 0.51 s per 1024 px image on an A100 with 4 LCM steps; target <= 0.3 s on
an H100/H200. Needs torch, transformers, diffusers; not Ray.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from archs import SD_VAE, T5_XXL, TINY_T5, TINY_VAE  # noqa: E402  (bench/archs.py)

SD_VAE = dict(SD_VAE, sample_size=512)  # the pipeline decodes 1024 px
PROMPT = (
    "a photograph of an astronaut riding a horse on the moon, earth rising behind the hills, "
    "detailed, high quality, golden light"
)
ANCHORS = {"pixart_delta_a100_lcm4_s_per_image": 0.51, "target_lcm4_s_per_image": 0.3,
           "target_low_vram_peak_gb": 8.0}  # fmt: skip


def build_t5(tiny: bool, device: str, dtype: Any) -> Any:
    import torch
    from transformers import T5Config, T5EncoderModel

    from training.feature_models import _dtype_kwarg

    with torch.device(device):  # weights are created (and initialised) on the device
        t5 = T5EncoderModel._from_config(
            T5Config(**(TINY_T5 if tiny else T5_XXL)), **_dtype_kwarg(dtype)
        )
    return t5.eval().requires_grad_(False)


def build_model(tiny: bool, device: str, dtype: Any, tok_dir: str) -> Any:
    """A `training.sample.Model` around an in-memory PixArtAlphaPipeline of random weights."""
    import torch
    from diffusers import AutoencoderKL, PixArtAlphaPipeline

    from training.checkpoint import pipeline_transformer_config
    from training.diffusion import inference_scheduler
    from training.feature_models import build_tiny_tokenizer
    from training.model import transformer_config, transformer_from_config
    from training.sample import MAX_SEQUENCE_LENGTH, Model

    resolution = 256 if tiny else 1024
    tconfig = transformer_config(
        "tiny" if tiny else "pixart-xl-2",
        resolution=resolution,
        caption_channels=64 if tiny else 4096,
        multi_scale=True,
        learned_sigma=True,
    )
    torch.manual_seed(0)
    t5 = build_t5(tiny, device, dtype)
    with torch.device(device):
        transformer = transformer_from_config(pipeline_transformer_config(tconfig)).to(dtype)
        vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE)).to(dtype)
    pipe = PixArtAlphaPipeline(
        tokenizer=build_tiny_tokenizer(tok_dir),
        text_encoder=t5,
        vae=vae.eval().requires_grad_(False),
        transformer=transformer.eval().requires_grad_(False),
        scheduler=inference_scheduler(),
    )
    return Model(
        pipe=pipe,
        source="random weights",
        kind="bench",
        checkpoint=None,
        resolution=resolution,
        multi_scale=True,
        max_length=MAX_SEQUENCE_LENGTH,
        scheduler_config=dict(pipe.scheduler.config),
    )


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def end_to_end(model: Any, sampler: str, reps: int, device: str) -> dict[str, Any]:
    """Seconds per image of `generate` (T5 + DiT loop + VAE decode), after one warm-up."""
    from training.sample import SampleSettings, generate

    settings = SampleSettings(sampler=sampler, size=(model.resolution, model.resolution))
    generate(model, [PROMPT], settings, device=device)  # warm-up (kernels, autotuning, compile)
    runs = [generate(model, [PROMPT], settings, device=device) for _ in range(reps)]
    return {
        "steps": settings.steps,
        "cfg": settings.cfg,
        "size": list(runs[0].size),
        "s_per_image": sum(r.seconds for r in runs) / reps,
        "min_s": min(r.seconds for r in runs),
        "peak_gb": (runs[0].peak_memory_bytes or 0) / 1e9 or None,
    }


def bare_parts(model: Any, sampler: str, reps: int, device: str) -> dict[str, float]:
    """The models alone on the same work: T5 on pre-tokenised input, the DiT forward x steps at
    the CFG batch, the VAE decode of one latent; seconds, mean of ``reps`` after a warm-up."""
    import torch

    from training.sample import SAMPLERS

    pipe, spec = model.pipe, SAMPLERS[sampler]
    n = 2 if spec.cfg > 1 else 1
    side = model.resolution // pipe.vae_scale_factor
    dtype = pipe.transformer.dtype
    tok = pipe.tokenizer([PROMPT, ""][:n], padding="max_length", max_length=model.max_length,
                         truncation=True, return_tensors="pt")  # fmt: skip
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(n, 4, side, side, generator=g, device=device, dtype=dtype)
    res = torch.tensor([[model.resolution] * 2] * n, device=device, dtype=dtype)
    cond = {"resolution": res, "aspect_ratio": torch.ones(n, 1, device=device, dtype=dtype)}

    def t5() -> Any:
        return pipe.text_encoder(ids, attention_mask=mask)[0]

    emb = t5()

    def dit() -> None:
        for t in range(spec.steps):
            pipe.transformer(latents, encoder_hidden_states=emb, encoder_attention_mask=mask,
                             timestep=torch.full((n,), 999 - t, device=device),
                             added_cond_kwargs=cond, return_dict=False)  # fmt: skip

    def vae() -> None:
        pipe.vae.decode(latents[:1] / pipe.vae.config.scaling_factor, return_dict=False)

    out = {}
    with torch.no_grad():
        for name, fn in (("t5_s", t5), ("dit_s", dit), ("vae_s", vae)):
            fn()
            sync(device)
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            sync(device)
            out[name] = (time.perf_counter() - start) / reps
    out["sum_s"] = out["t5_s"] + out["dit_s"] + out["vae_s"]
    return out


def low_vram_run(model: Any, tiny: bool, device: str, dtype: Any) -> dict[str, Any]:
    """`generate(low_vram=True)` from models in CPU memory (as `load_model` leaves them), DPM 20
    steps; then T5 is rebuilt on the device and VAE tiling switched off for the next variants."""
    import torch

    from training.sample import SampleSettings, generate

    model.pipe.to("cpu")
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    settings = SampleSettings(sampler="dpm", size=(model.resolution,) * 2, low_vram=True)
    gen = generate(model, [PROMPT], settings, device=device)
    model.pipe.text_encoder = build_t5(tiny, device, dtype)
    model.pipe.vae.disable_tiling()
    return {"s_per_image": gen.seconds, "peak_gb": (gen.peak_memory_bytes or 0) / 1e9 or None}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tiny", action="store_true", help="tiny models on CPU, 256 px (smoke run)")
    ap.add_argument("--reps", type=int, default=None, help="timed runs (default 5 GPU, 1 tiny)")
    ap.add_argument("--fuse-qkv", action="store_true", help="also measure fused QKV projections")
    ap.add_argument("--channels-last", action="store_true", help="also measure a channels_last VAE")
    ap.add_argument(
        "--compile", action="store_true", help="also measure torch.compile(transformer)"
    )
    ap.add_argument(
        "--compile-mode", default="default", help="torch.compile mode (default 'default')"
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()

    import diffusers
    import torch

    if not args.tiny and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny for the CPU smoke run")
    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    reps = args.reps or (1 if args.tiny else 5)
    results: dict[str, Any] = {
        "device": "cpu" if args.tiny else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "tiny": args.tiny,
        "reps": reps,
        "anchors": ANCHORS,
        "variants": {},
    }

    def report(name: str, value: Any) -> None:
        results["variants"][name] = value
        print(f"{name:28s} {json.dumps(value)}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = build_model(args.tiny, device, dtype, os.path.join(tmp, "tok"))
        results["build_s"] = time.perf_counter() - t0
        results["attention"] = type(model.pipe.transformer.attn_processors[
            next(iter(model.pipe.transformer.attn_processors))]).__name__  # fmt: skip
        print(f"models built in {results['build_s']:.1f}s on {results['device']}", flush=True)

        for sampler in ("dpm", "lcm"):
            e2e = end_to_end(model, sampler, reps, device)
            parts = bare_parts(model, sampler, reps, device)
            e2e["parts"] = parts
            e2e["ratio"] = parts["sum_s"] / e2e["s_per_image"]
            report(f"baseline/{sampler}", e2e)
        report("low_vram/dpm", low_vram_run(model, args.tiny, device, dtype))

        if args.fuse_qkv:
            model.pipe.transformer.fuse_qkv_projections()
            report("fuse_qkv/lcm", end_to_end(model, "lcm", reps, device))
        if args.channels_last:
            model.pipe.vae.to(memory_format=torch.channels_last)
            report("channels_last_vae/lcm", end_to_end(model, "lcm", reps, device))
        if args.compile:
            t0 = time.perf_counter()
            model.pipe.transformer.compile(mode=args.compile_mode, dynamic=False)
            end_to_end(model, "lcm", 1, device)  # the compile happens in the first calls
            compile_s = time.perf_counter() - t0
            lcm = end_to_end(model, "lcm", reps, device)
            dpm = end_to_end(model, "dpm", reps, device)  # cfg: batch 2, a second graph
            report("compiled/lcm", {**lcm, "compile_and_first_runs_s": compile_s})
            report("compiled/dpm", dpm)

        normal_peak = results["variants"]["baseline/dpm"]["peak_gb"]
        low_peak = results["variants"]["low_vram/dpm"]["peak_gb"]
        results["peak_gb"] = {"normal": normal_peak, "low_vram": low_peak}

    print(json.dumps({k: v for k, v in results.items() if k != "variants"}, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
