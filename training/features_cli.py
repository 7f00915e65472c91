"""`alphaset features`: the command-line side of `training.features.extract_features`."""

from __future__ import annotations

import argparse

from pipeline.stage import add_stage_flags, stage_args
from training.buckets import RESOLUTIONS
from training.feature_models import VAE_DTYPES

EPILOG = """\
Reads:  STORE/images/, STORE/meta/, the caption source (captions/<TAG>/, or meta alt_text / label),
        STORE/views/<NAME>.parquet with --view.
Writes: STORE/features/<tag>/NNNNNN.tar (WebDataset: <key>.t5.npy, .mask.npy, .vae.npy, .json),
        STORE/features/<tag>/_null.npz (empty caption, for CFG), STORE/_status/features/<tag>/
        (config.json + one status record per shard), manifest.json.
        Re-running resumes: finished shards are skipped.
Default tag: {t5}_{vae}_{resolution}[ms]_{captions}, e.g. t5-v1_1-xxl_sd-vae-ft-ema_512ms_llava-1-5-7b.
Example: alphaset features --store ./store --resolution 512 --multi-scale --view stage2 \\
           --captions llava-1.5-7b --workers 8 --gpus-per-worker 1"""


def _run(args: argparse.Namespace) -> int:
    from training.features import extract_features

    summary = extract_features(
        args.store,
        resolution=args.resolution,
        t5=args.t5,
        vae=args.vae,
        multi_scale=args.multi_scale,
        view=args.view,
        captions=args.captions,
        tag=args.tag,
        batch_size=args.batch_size,
        text_batch_size=args.text_batch_size,
        max_length=args.max_length,
        dtype=args.dtype,
        vae_dtype=args.vae_dtype,
        threads=args.threads,
        **stage_args(args),
    )
    print("\n".join(summary.lines()))
    return 0 if summary.ok else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "features",
        help="T5 text embeddings + VAE latents in PixArt's aspect-ratio buckets (Ray stage)",
        description="Precompute T5 caption embeddings and VAE latents, shard-aligned, for training.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--store", required=True, help="store directory or fsspec URL")
    p.add_argument(
        "--resolution", type=int, required=True, choices=RESOLUTIONS, help="training resolution"
    )
    p.add_argument(
        "--multi-scale",
        action="store_true",
        help="each image to its nearest PixArt aspect-ratio bucket (ratios 0.25-4.0); default: square crop",
    )
    p.add_argument("--view", default=None, help="only the keys of views/NAME.parquet")
    p.add_argument(
        "--captions",
        default=None,
        help="caption source: a caption TAG, 'alt' (ingested alt text) or 'label' ('a photo of a {label}'); "
        "default: the store's only caption tag, else alt",
    )
    p.add_argument("--t5", default="t5-v1_1-xxl", help="T5 preset (t5-v1_1-xxl, tiny) or local DIR")
    p.add_argument(
        "--vae", default="sd-vae-ft-ema", help="VAE preset (sd-vae-ft-ema, tiny) or local DIR"
    )
    p.add_argument(
        "--tag", default=None, help="output tag (default: from models, resolution and captions)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="images per VAE batch (default 16)")
    p.add_argument(
        "--text-batch-size", type=int, default=128, help="captions per T5 batch (default 128)"
    )
    p.add_argument(
        "--max-length", type=int, default=120, help="T5 tokens, padded (default 120, as PixArt)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "bf16", "fp16", "fp32"),
        help="T5's dtype; auto: bf16 on GPU (as PixArt), fp32 on CPU",
    )
    p.add_argument(
        "--vae-dtype",
        default="fp32",
        choices=VAE_DTYPES,
        help="the VAE's dtype (default fp32, as PixArt-α at single scale; bf16 rounds the latents)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="image decode threads per worker (default min(8, CPUs))",
    )
    add_stage_flags(p)
    p.set_defaults(func=_run)
