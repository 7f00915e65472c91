"""`alphaset app`: start the Gradio app on a store and/or a checkpoint."""

from __future__ import annotations

import argparse
import os

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860

EPILOG = """\
Reads:  --store: a store (images, meta, captions, scores, embeddings, views; never extracted).
        --checkpoint: a diffusers export or a training run / stage / step-N folder, as for
        `alphaset sample`. Either may be omitted: its tab then says what to pass.
Writes: STORE/views/NAME.parquet when you save a filter as a view (what `manifest view create`
        writes); nothing else. Generated images are served from a temporary folder.
Network: binds to 127.0.0.1 (this machine only) unless --host is given. --host 0.0.0.0 serves the
        app to every machine that can reach this one: they can read every image and row of the
        store, write views into it, and run the model. There is no login.
Examples: alphaset app --store demo-out/store --checkpoint demo-out/export
          alphaset app --store s3://bucket/store --checkpoint runs/pixart/step-20000 --low-vram"""


def _run(args: argparse.Namespace) -> int:
    for name, value in (
        ("TOKENIZERS_PARALLELISM", "false"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("GRADIO_ANALYTICS_ENABLED", "False"),
    ):
        os.environ.setdefault(name, value)
    from diffusers.utils import logging as diffusers_logging

    from pipeline.app.ui import build_app
    from pipeline.cli import UserError

    diffusers_logging.disable_progress_bar()

    app = build_app(
        args.store,
        args.checkpoint,
        low_vram=args.low_vram,
        device=args.device,
        dtype=args.dtype,
        controlnet=args.controlnet,
        hed=args.hed,
    )
    print(f"alphaset app on http://{args.host}:{args.port}  (Ctrl+C stops it)", flush=True)
    try:
        app.launch(
            server_name=args.host,
            server_port=args.port,
            show_error=True,
            quiet=True,
            inbrowser=False,
            footer_links=[],
        )
    except OSError as e:  # port taken, address not on this machine
        raise UserError(f"cannot serve on {args.host}:{args.port}: {e}") from e
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from training.feature_models import DTYPES

    p = sub.add_parser(
        "app",
        help="web app: generate images and explore a store (Gradio)",
        description="Start a Gradio app with two tabs: Generate (PixArt sampling, as `alphaset "
        "sample`) and Explore (grid, filters, views, duplicates, semantic search over a store).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--store", default=None, help="store to explore (local path or fsspec URL)")
    p.add_argument("--checkpoint", default=None, help="export, run, stage or step-N folder")
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to bind (default {DEFAULT_HOST}; 0.0.0.0 exposes it to the network)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--low-vram", action="store_true", help="T5, DiT and VAE one after the other")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu … (default: cuda if any)")
    p.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--controlnet", default=None, help="ControlNet file (finetune controlnet)")
    p.add_argument(
        "--hed", default=None, help="HED for photo → edges (default: the store's edges/<tag> HED)"
    )
    p.set_defaults(func=_run)
