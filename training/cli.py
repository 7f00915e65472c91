"""`alphaset train` and `alphaset export`: the command-line side of `training.train.train`,
`training.launch.launch` (in this process or on Ray Train workers) and
`training.export.export_diffusers`."""

from __future__ import annotations

import argparse

from training.config import STRATEGIES

TRAIN_EPILOG = """\
Reads:  the config (TOML: [run], [defaults], [[stage]]), STORE/features/<tag>/ of every stage,
        STORE/views/<name>.parquet of stages that name a view.
Writes: <dir>/<run>/config.json, stages.toml, run.json, and per stage <stage>/checkpoints/step-N/
        (state.json, optimizer.pt and the objective's weights: model/ema.safetensors, LoRA or
        ControlNet adapters), metrics.jsonl, tb/ (TensorBoard), samples/ (grids), done.json.
A stage's objective (diffusion, lcm, controlnet, dreambooth) and its [stage.<objective>] table
decide what trains; the loop, --resume, --device and --workers are the same for all.
Stages run in order; each starts from the previous one's final weights (init_from). --resume
continues the first unfinished stage from its latest checkpoint, exactly, and skips finished ones.
Examples: alphaset train --config configs/tiny.toml --store demo-out/store
          alphaset train --config configs/pixart_alpha.toml --resume --workers 8 --gpus-per-worker 1
          tensorboard --logdir runs/pixart_alpha"""

EXPORT_EPILOG = """\
Reads:  a checkpoint (runs/<run>/<stage>/checkpoints/step-N, a stage folder or a run folder) and
        the T5 and VAE its features were made with (or --t5/--vae).
Writes: OUT/ with model_index.json, transformer/, scheduler/, vae/, text_encoder/, tokenizer/:
        diffusers.PixArtAlphaPipeline.from_pretrained(OUT) loads it.
Example: alphaset export --checkpoint runs/tiny/aesthetic --to diffusers demo-out/pixart-tiny"""


def _train(args: argparse.Namespace) -> int:
    from training.config import load_config
    from training.launch import launch

    cfg = load_config(args.config, store=args.store, dir=args.runs, strategy=args.strategy)
    finals = launch(
        cfg, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker, resume=args.resume, stop_after=args.stop_after,
        progress=not args.quiet, device=args.device,
    )  # fmt: skip
    for stage in cfg.stages:
        where = finals.get(stage.name)
        print(f"{stage.name}: {where or 'not finished (re-run with --resume)'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from training.export import export_diffusers

    out = export_diffusers(
        args.checkpoint, args.out, weights=args.weights, t5=args.t5, vae=args.vae
    )
    print(f"exported {args.weights} weights to {out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a PixArt DiT on feature shards, stage after stage",
        description="Train PixArt's DiT on precomputed features: the stages of a TOML config in order.",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="stages TOML file")
    p.add_argument(
        "--resume", action="store_true", help="continue the run from its latest checkpoint"
    )
    p.add_argument(
        "--workers", type=int, default=1, help="training workers; > 1 runs Ray Train (default 1)"
    )
    p.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        help="GPUs per Ray Train worker (default 0: CPU, gloo)",
    )
    p.add_argument(
        "--cpus-per-worker", type=float, default=1.0, help="CPUs per Ray Train worker (default 1)"
    )
    p.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=None,
        help="ddp or fsdp with several workers (default: the config's)",
    )
    p.add_argument(
        "--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)"
    )
    p.add_argument("--store", default=None, help="override [run] store")
    p.add_argument("--runs", default=None, help="override [run] dir (runs folder)")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="stop (with a checkpoint) after N steps; --resume continues",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_train)

    e = sub.add_parser(
        "export",
        help="export a training checkpoint as a diffusers PixArtAlphaPipeline folder",
        description="Export a checkpoint (EMA weights by default) with its VAE, T5 and tokenizer.",
        epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--checkpoint", required=True, help="step-N folder, stage folder or run folder")
    e.add_argument("--to", choices=["diffusers"], required=True, help="export format (diffusers)")
    e.add_argument("out", metavar="OUT", help="output folder (must not exist or be empty)")
    e.add_argument(
        "--weights", choices=["ema", "model"], default="ema", help="EMA (default) or raw weights"
    )
    e.add_argument("--t5", default=None, help="T5 PRESET|DIR (default: the one the features used)")
    e.add_argument(
        "--vae", default=None, help="VAE PRESET|DIR (default: the one the features used)"
    )
    e.set_defaults(func=_export)
    from training import import_cli

    import_cli.register(sub)  # alphaset import pixart
