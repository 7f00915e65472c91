"""`alphaset edges` (the HED edge-map stage) and `alphaset finetune controlnet`: the command-line
side of training.hed and training.controlnet. (LoRA is a stage option of `alphaset train`.)"""

from __future__ import annotations

import argparse

EDGES_EPILOG = """\
Reads:  STORE's ingested image shards; --hed: 'tiny' (random, for tests), a folder with
        config.json + model.safetensors, or a HED weights file (.safetensors / .pth state dict).
Writes: STORE/edges/<tag>/<shard>.parquet (key, edges PNG, height, width, error) + status records;
        tag default hed-<resolution>. Edge maps are the feature stage's crop at that resolution.
Example: alphaset edges --store demo-out/store --hed weights/hed.pth --resolution 512"""

CONTROLNET_EPILOG = """\
Reads:  --base: a training run / stage / step-N folder (frozen); STORE/features/<tag> (latents +
        T5) and STORE/edges/<tag> (HED maps, encoded once by the features' VAE).
Writes: OUT/controlnet.safetensors (block copies + zero linears only), OUT/metrics.jsonl.
Example: alphaset finetune controlnet --store demo-out/store --base runs/tiny --features tiny-256 \\
           --edges hed-256 --blocks 13 --steps 1000 --out runs/controlnet-hed
Then:    alphaset sample --checkpoint runs/tiny --controlnet runs/controlnet-hed \\
           --control-image edge.png --prompt "a house\""""


def _edges(args: argparse.Namespace) -> int:
    from training.hed import extract_edges

    summary = extract_edges(
        args.store, args.hed, args.resolution, tag=args.tag, workers=args.workers,
        use_ray=not args.local, progress=not args.quiet,
    )  # fmt: skip
    for line in summary.lines():
        print(line)
    return 0 if summary.ok else 1


def _controlnet(args: argparse.Namespace) -> int:
    from training.controlnet import train_controlnet

    path, losses = train_controlnet(
        args.store, args.base, args.features, args.edges, args.out, view=args.view,
        blocks=args.blocks, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, progress=not args.quiet,
    )  # fmt: skip
    print(f"wrote {path} (loss {losses[0]:.4f} -> {losses[-1]:.4f})")
    return 0


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
    e.add_argument("--tag", default=None, help="edges/<tag> (default hed-<resolution>)")
    e.add_argument("--workers", type=int, default=1)
    e.add_argument("--local", action="store_true", help="run in this process, no Ray")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=_edges)

    ft = sub.add_parser("finetune", help="fine-tune a trained model (ControlNet)")
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
    c.add_argument("--steps", type=int, default=1000)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--lr", type=float, default=2e-5)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True)
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=_controlnet)
