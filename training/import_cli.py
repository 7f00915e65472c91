"""`alphaset import pixart`: official PixArt-α/δ ``.pth`` checkpoints in alphaset's layout."""

from __future__ import annotations

import argparse

EPILOG = """\
Reads:  a PixArt-α/δ transformer checkpoint (.pth: PixArt-XL-2-256x256, -512x512, -1024-MS,
        PixArt-LCM-XL-2-1024-MS…), loaded with torch.load(weights_only=True).
Writes: OUT/config.json + diffusion_pytorch_model.safetensors (a diffusers PixArtTransformer2DModel
        folder: use it as a stage's init_from, or with 'alphaset export'), OUT/y_embedding.safetensors
        (PixArt's learned null caption: null = "y_embedding"), OUT/alphaset_import.json.
Infers: layers/width/patch from the tensors, multi-scale from its size embedders, the resolution
        from its pos_embed, pe_interpolation from PixArt-α's table (1.0 at 256/512, 2.0 at 1024).
Example: alphaset import pixart PixArt-XL-2-1024-MS.pth --out models/pixart-1024-ms"""


def _run(args: argparse.Namespace) -> int:
    from pipeline.cli import UserError
    from training.pixart_import import write_import

    pe: float | str | None = args.pe_interpolation
    if pe is not None and pe not in ("alpha", "sigma"):
        try:
            pe = float(pe)
        except ValueError:
            raise UserError(
                f"--pe-interpolation must be a number, alpha or sigma, got {pe!r}"
            ) from None
    got = write_import(
        args.pth, args.out, weights=args.weights, resolution=args.resolution, pe_scale=pe,
        num_heads=args.heads,
    )  # fmt: skip
    c = got.config
    print(
        f"imported {args.pth} -> {args.out}: {c['num_layers']} layers x {c['cross_attention_dim']}, "
        f"{got.resolution} px{' multi-scale' if got.multi_scale else ''}, "
        f"pe_interpolation {c['interpolation_scale']}, "
        f"y_embedding {'kept' if got.y_embedding is not None else 'absent'}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import",
        help="bring official checkpoints in: alphaset import pixart FILE.pth --out DIR",
        description="Convert official checkpoints into alphaset's layout.",
    )
    kinds = p.add_subparsers(dest="kind", metavar="KIND")
    kinds.required = True
    x = kinds.add_parser(
        "pixart",
        help="a PixArt-α/δ .pth transformer checkpoint → a diffusers transformer folder",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    x.add_argument("pth", help="the .pth file")
    x.add_argument("--out", required=True, help="new folder to write")
    x.add_argument(
        "--weights",
        default="state_dict",
        choices=("state_dict", "ema"),
        help="which weights of a training checkpoint (released files hold state_dict)",
    )
    x.add_argument(
        "--resolution",
        type=int,
        default=None,
        choices=(256, 512, 1024),
        help="only for a file without pos_embed",
    )
    x.add_argument(
        "--pe-interpolation",
        default=None,
        help="a number, alpha or sigma (default: PixArt-α's value for the resolution)",
    )
    x.add_argument(
        "--heads", type=int, default=None, help="attention heads (default: the preset's)"
    )
    x.set_defaults(func=_run)
