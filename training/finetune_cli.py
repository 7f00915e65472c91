"""`alphaset edges` (the HED edge-map stage), `alphaset finetune controlnet|dreambooth` and
`alphaset distill lcm`: friendly front ends of the one trainer. Each builds a one-stage config
(training.recipes), writes it into the run folder --out (config.json, stages.toml: re-run or
edit it with `alphaset train --config OUT/stages.toml`) and trains it with training.launch, on
--device or on --workers Ray Train workers, resumable with --resume. (LoRA is a stage option of
`alphaset train` and --lora here.)"""

from __future__ import annotations

import argparse

EDGES_EPILOG = """\
Reads:  STORE's ingested image shards; --hed: 'tiny' (random, for tests), a folder with
        config.json + model.safetensors, or a HED weights file (.safetensors / .pth state dict).
Writes: STORE/edges/<tag>/<shard>.parquet (key, edges PNG, height, width, error) + status records;
        tag default hed-<resolution>. Edge maps are the feature stage's crop at that resolution.
Example: alphaset edges --store demo-out/store --hed weights/hed.pth --resolution 512"""

RUN_WRITES = """\
Writes: OUT/ a run folder: config.json, stages.toml, run.json and OUT/<stage>/checkpoints/step-N/
        (state.json, optimizer.pt and the weights below), metrics.jsonl, tb/, done.json."""

CONTROLNET_EPILOG = f"""\
Reads:  --base: a training run / stage / step-N folder (frozen); STORE/features/<tag> (latents +
        T5) and STORE/edges/<tag> (HED maps, encoded by the features' VAE at each batch's bucket).
{RUN_WRITES}
        Weights: controlnet.safetensors (EMA) / controlnet_model.safetensors (block copies +
        zero linears only; state.json names the base).
Example: alphaset finetune controlnet --store demo-out/store --base runs/tiny --features tiny-256 \\
           --edges hed-256 --blocks 13 --steps 1000 --bf16 --out runs/controlnet-hed
Then:    alphaset sample --checkpoint runs/tiny --controlnet runs/controlnet-hed \\
           --control-image edge.png --prompt "a house\""""


def _edges(args: argparse.Namespace) -> int:
    from training.hed import extract_edges

    summary = extract_edges(
        args.store, args.hed, args.resolution, tag=args.tag, workers=args.workers,
        use_ray=not args.local, progress=not args.quiet, multi_scale=args.multi_scale,
    )  # fmt: skip
    for line in summary.lines():
        print(line)
    return 0 if summary.ok else 1


def _controlnet(args: argparse.Namespace) -> int:
    from training.recipes import controlnet_config

    cfg = controlnet_config(
        args.store, args.base, args.features, args.edges, args.out, view=args.view,
        blocks=args.blocks, **_loop_settings(args),
    )  # fmt: skip
    return _run(cfg, args)


DREAMBOOTH_EPILOG = f"""\
Reads:  --base: a training run / stage / step-N folder (its T5 and VAE: the ones its features were
        made with); --instance-dir: a folder of images (jpg/png/webp/bmp) of the subject.
{RUN_WRITES}
        Weights: model.safetensors/ema.safetensors, or with --lora only lora.safetensors
        adapters on the base. OUT/dreambooth/dreambooth_inputs.safetensors caches the encoded
        photos, prompts and generated prior images (a resumed run reuses them).
Example: alphaset finetune dreambooth --base runs/tiny --instance-dir dog/ \\
           --instance-prompt "a photo of sks dog" --class-prompt "a photo of a dog" \\
           --prior-images 100 --steps 400 --bf16 --out runs/sks-dog
Then:    alphaset sample --checkpoint runs/sks-dog --prompt "a photo of sks dog on the beach\""""

LCM_EPILOG = f"""\
Reads:  --teacher: a training run / stage / step-N folder (frozen); STORE/features/<tag> (latents +
        T5, at the teacher's resolution), optionally only the samples of --view.
{RUN_WRITES}
        Recipe: PixArt-δ's by default: the teacher guides with fixed w = --teacher-guidance (4.5 in
        PixArt's cond + w(cond - uncond), diffusers' 5.5), no w-embedding, grad clip 0.01.
        --guidance-embedding: the LCM paper's w ~ U[3, 15] embedded into the student.
        Weights: model.safetensors/ema.safetensors (the EMA target; with --guidance-embedding the
        --guidance embedding folded in + guidance_embedding.safetensors); with --lora only
        lora.safetensors adapters on the teacher.
Example: alphaset distill lcm --teacher runs/tiny --store demo-out/store --features tiny-256 \\
           --steps 1000 --bf16 --out runs/tiny-lcm
Then:    alphaset sample --checkpoint runs/tiny-lcm --sampler lcm --steps 4 --prompt "a cat\""""


def _dreambooth(args: argparse.Namespace) -> int:
    from training.recipes import dreambooth_config

    cfg = dreambooth_config(
        args.base, args.instance_dir, args.instance_prompt, args.out,
        class_prompt=args.class_prompt, prior_images=args.prior_images,
        prior_weight=args.prior_weight, prior_steps=args.prior_steps, lora=args.lora,
        **_loop_settings(args),
    )  # fmt: skip
    return _run(cfg, args)


def _lcm(args: argparse.Namespace) -> int:
    from training.recipes import lcm_config

    cfg = lcm_config(
        args.teacher, args.store, args.features, args.out, view=args.view, lora=args.lora,
        guidance=args.guidance, guidance_embedding=args.guidance_embedding,
        teacher_guidance=args.teacher_guidance, **_loop_settings(args),
    )  # fmt: skip
    return _run(cfg, args)


def _loop_settings(args: argparse.Namespace) -> dict:
    out = {
        "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "save_every": args.save_every, "seed": args.seed, "bf16": args.bf16,
        "strategy": args.strategy,
    }  # fmt: skip
    if args.ema is not None:
        out["ema"] = args.ema
    if args.sample_every:
        out["sample_every"] = args.sample_every
        if "instance_prompt" not in args:
            out["validation_prompts"] = args.validation_prompt or []
    return out


def _run(cfg, args: argparse.Namespace) -> int:  # noqa: ANN001
    from training.recipes import losses, run_recipe

    final = run_recipe(
        cfg, resume=args.resume, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        device=args.device, progress=not args.quiet,
    )  # fmt: skip
    if final is None:
        print(f"{cfg.run_dir}: not finished (re-run with --resume)")
        return 0
    ls = losses(cfg.run_dir)
    print(f"wrote {final} (loss {ls[0]:.5f} -> {ls[-1]:.5f}); config: {cfg.run_dir}/stages.toml")
    return 0


def _loop_flags(
    p: argparse.ArgumentParser, steps: int, batch_size: int, lr: float, ema: str
) -> None:
    """The training-loop and placement flags every fine-tuning command takes, with its defaults."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size, help="per worker")
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--ema", type=float, default=None, help=f"EMA decay (default {ema})")
    p.add_argument(
        "--save-every",
        type=int,
        default=None,
        help="checkpoint every N steps (default: at the end)",
    )
    p.add_argument(
        "--sample-every", type=int, default=0,
        help="validation grid every N steps, with this objective's sampler (default 0: none)",
    )  # fmt: skip
    p.add_argument(
        "--validation-prompt", action="append", default=None, metavar="TEXT",
        help="a validation prompt (repeatable; DreamBooth uses its instance prompt)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="run folder (new, or this run's with --resume)")
    p.add_argument("--resume", action="store_true", help="continue OUT from its latest checkpoint")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default fp32)")
    p.add_argument(
        "--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)"
    )
    p.add_argument("--workers", type=int, default=1, help="> 1: Ray Train workers")
    p.add_argument(
        "--strategy", choices=("ddp", "fsdp"), default="ddp",
        help="with several workers: DDP (whole model per worker) or FSDP (sharded)",
    )  # fmt: skip
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray Train worker")
    p.add_argument("--quiet", action="store_true")


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    e = sub.add_parser(
        "edges", help="HED edge maps of every image (ControlNet condition)",
        description="Compute HED edge maps as a store stage.", epilog=EDGES_EPILOG,
        formatter_class=fmt,
    )  # fmt: skip
    e.add_argument("--store", required=True)
    e.add_argument("--hed", default="tiny", help="HED preset, folder or weights file")
    e.add_argument("--resolution", type=int, default=512, help="crop side (256, 512, 1024)")
    e.add_argument(
        "--multi-scale", action="store_true",
        help="crop each image to its aspect-ratio bucket (for multi-scale features / ControlNet)",
    )  # fmt: skip
    e.add_argument("--tag", default=None, help="edges/<tag> (default hed-<resolution>[-ms])")
    e.add_argument("--workers", type=int, default=1)
    e.add_argument("--local", action="store_true", help="run in this process, no Ray")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_edges)

    ft = sub.add_parser("finetune", help="fine-tune a trained model (ControlNet, DreamBooth)")
    fsub = ft.add_subparsers(dest="finetune_command", metavar="KIND", required=True)
    c = fsub.add_parser(
        "controlnet", help="train a PixArt-δ ControlNet on HED edges",
        description="Train a ControlNet-Transformer on a frozen base.", epilog=CONTROLNET_EPILOG,
        formatter_class=fmt,
    )  # fmt: skip
    c.add_argument("--store", required=True)
    c.add_argument("--base", required=True, help="run / stage / step-N folder")
    c.add_argument("--features", required=True, help="features/<tag>")
    c.add_argument("--edges", required=True, help="edges/<tag>")
    c.add_argument("--view", default=None)
    c.add_argument("--blocks", type=int, default=13, help="base blocks copied (PixArt-δ: 13)")
    _loop_flags(c, steps=1000, batch_size=4, lr=2e-5, ema="0: the saved EMA = the weights")
    c.set_defaults(func=_controlnet)

    d = fsub.add_parser(
        "dreambooth", help="DreamBooth on a few images of a subject (full or LoRA)",
        description="Fine-tune a checkpoint on instance images, with optional prior preservation.",
        epilog=DREAMBOOTH_EPILOG, formatter_class=fmt,
    )  # fmt: skip
    d.add_argument("--base", required=True, help="run / stage / step-N folder")
    d.add_argument("--instance-dir", required=True, help="folder of the subject's images")
    d.add_argument("--instance-prompt", required=True, help='e.g. "a photo of sks dog"')
    d.add_argument("--class-prompt", default=None, help='e.g. "a photo of a dog" (prior)')
    d.add_argument("--prior-images", type=int, default=0, help="class images generated (prior)")
    d.add_argument("--prior-weight", type=float, default=1.0)
    d.add_argument("--prior-steps", type=int, default=20, help="sampler steps per class image")
    d.add_argument("--lora", type=int, default=None, metavar="RANK", help="train LoRA adapters")
    _loop_flags(d, steps=400, batch_size=2, lr=5e-6, ema="0.99")
    d.set_defaults(func=_dreambooth)

    ds = sub.add_parser("distill", help="distil a trained model (LCM)")
    dsub = ds.add_subparsers(dest="distill_command", metavar="KIND", required=True)
    lc = dsub.add_parser(
        "lcm", help="latent consistency distillation (PixArt-δ LCM / LCM-LoRA)",
        description="Distil a checkpoint into a few-step LCM student.", epilog=LCM_EPILOG,
        formatter_class=fmt,
    )  # fmt: skip
    lc.add_argument("--teacher", required=True, help="run / stage / step-N folder")
    lc.add_argument("--store", required=True)
    lc.add_argument("--features", required=True, help="features/<tag>")
    lc.add_argument("--view", default=None)
    lc.add_argument("--lora", type=int, default=None, metavar="RANK", help="LCM-LoRA adapters")
    lc.add_argument(
        "--teacher-guidance",
        type=float,
        default=4.5,
        help="PixArt-δ's fixed teacher w in cond + w(cond - uncond) (default 4.5 = diffusers' 5.5)",
    )
    lc.add_argument(
        "--guidance-embedding",
        action="store_true",
        help="the LCM paper's variant: w ~ U[3, 15] embedded into the student",
    )
    lc.add_argument(
        "--guidance",
        type=float,
        default=4.5,
        help="with --guidance-embedding: the w folded into the saved model",
    )
    _loop_flags(lc, steps=1000, batch_size=2, lr=2e-5, ema="0.95, the LCM target network")
    lc.set_defaults(func=_lcm)
