"""`alphaset sample`: the command-line side of `training.sample.sample`."""

from __future__ import annotations

import argparse

from training.feature_models import DTYPES
from training.sample import GRID_FILE, RESULT_FILE, SAMPLERS

SAMPLER_LINES = "\n".join(
    f"  {s.name:6s} {s.scheduler}: {s.about}; {s.steps} steps, cfg {s.cfg:g}"
    for s in SAMPLERS.values()
)
EPILOG = f"""\
Reads:  --checkpoint: a diffusers export (alphaset export … --to diffusers OUT, or any
        PixArtAlphaPipeline folder), or a training run / stage / step-N folder (its EMA weights
        and the T5 + VAE its features were made with).
Writes: OUT/NNN_seedS.png (one per image), OUT/{GRID_FILE}, OUT/{RESULT_FILE} (every setting, seeds,
        scheduler config, versions, timings, peak GPU memory).
Samplers, with PixArt's default steps and cfg:
{SAMPLER_LINES}
Sizes snap to the nearest aspect-ratio bucket of the model's training resolution (e.g. 1024x768 ->
1152x832 for a 1024 px model). Image i gets seed SEED+i: same seed and settings, same image.
--low-vram: T5 first (streamed layer by layer), freed, then the DiT, then a tiled VAE decode.
Examples: alphaset sample --checkpoint demo-out/pixart-tiny --prompt "a photo of a cat" --sampler sa
          alphaset sample --checkpoint runs/pixart_alpha --prompts prompts.txt --size 1024x768 \\
            --sampler lcm --low-vram --out samples/lcm"""


def _run(args: argparse.Namespace) -> int:
    from training.sample import read_prompts, sample

    prompts = read_prompts(args.prompts) if args.prompts else args.prompt
    result = sample(
        args.checkpoint,
        prompts,
        sampler=args.sampler,
        steps=args.steps,
        cfg=args.cfg,
        seed=args.seed,
        size=args.size,
        batch=args.batch,
        per_prompt=args.per_prompt,
        out=args.out,
        low_vram=args.low_vram,
        device=args.device,
        dtype=args.dtype,
        weights=args.weights,
        progress=not args.quiet,
        lora=args.lora,
        controlnet=args.controlnet,
        control_image=args.control_image,
        y_embedding=args.y_embedding,
    )
    s, gen = result.settings, result.generation
    w, h = gen.size
    asked = f" (asked {s.size[0]}x{s.size[1]})" if s.size and tuple(s.size) != gen.size else ""
    n = len(gen.images)
    print(
        f"{s.sampler} ({gen.scheduler['class']}): {s.steps} steps, cfg {s.cfg:g}, {w}x{h}{asked}, "
        f"seeds {gen.seeds[0]}-{gen.seeds[-1]}{', low-vram' if s.low_vram else ''}"
    )
    print(f"wrote {n} image{'s' * (n != 1)}, {GRID_FILE} and {RESULT_FILE} to {args.out}")
    line = f"{gen.seconds / n:.2f} s per image"
    if gen.peak_memory_bytes is not None:
        line += f", peak GPU memory {gen.peak_memory_bytes / 2**30:.2f} GiB"
    print(line)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sample",
        help="generate images from a trained model (DPM-Solver, SA-Solver, IDDPM, LCM)",
        description="Generate images from a checkpoint or a diffusers export with PixArt's samplers.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="export folder, run, stage or step-N folder")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    src.add_argument("--prompts", help="text file, one prompt per line")
    names = ",".join(SAMPLERS)
    p.add_argument("--sampler", default="dpm", metavar=f"{{{names}}}", help="sampler (default dpm)")
    p.add_argument(
        "--steps", type=int, default=None, help="sampling steps (default: the sampler's)"
    )
    p.add_argument(
        "--cfg", type=float, default=None, help="guidance scale (default: the sampler's)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i: SEED+i")
    p.add_argument(
        "--size", default=None, help="WxH, snapped to a bucket (default: the model's square)"
    )
    p.add_argument("--batch", type=int, default=1, help="images per DiT call (default 1)")
    p.add_argument("--per-prompt", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--low-vram", action="store_true", help="T5, DiT and VAE one after the other")
    p.add_argument(
        "--device", default=None, help="cuda, cuda:1, cpu … (default: cuda if available)"
    )
    p.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument(
        "--weights",
        choices=["ema", "model"],
        default="ema",
        help="checkpoint weights (default ema)",
    )
    p.add_argument(
        "--lora",
        default=None,
        metavar="PATH[:SCALE]",
        help="LoRA adapter file (lora.safetensors) or LoRA checkpoint folder; SCALE default 1",
    )
    p.add_argument(
        "--controlnet", default=None, help="ControlNet file/folder (finetune controlnet)"
    )
    p.add_argument("--control-image", default=None, help="edge map image for --controlnet")
    p.add_argument(
        "--y-embedding",
        default=None,
        metavar="SOURCE",
        help="PixArt's learned null caption as CFG's unconditional input: a PixArt .pth or an "
        "'alphaset import pixart' folder (default: T5 of the empty prompt)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run)
