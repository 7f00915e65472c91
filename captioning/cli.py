"""`alphaset caption`: the command-line side of the caption stage (a thin layer over `caption_store`)."""

from __future__ import annotations

import argparse

from pipeline.cli import positive_int
from pipeline.stage import add_stage_flags, stage_args

from .captioner import CACHES, DEFAULT_PROMPT, DTYPES
from .models import PRESETS

EPILOG = f"""\
Reads: STORE/images/*.tar and STORE/meta/*.parquet (alt_text with --prompt-with-alt).
Writes: STORE/captions/<tag>/NNNNNN.parquet (key, caption, model, prompt, n_tokens, truncated,
error), STORE/_status/captions/<tag>/ (a record per shard, config.json) and STORE/manifest.json.
Shards already captioned under the same tag are skipped, so re-running resumes.
Runs on the Ray cluster in RAY_ADDRESS (as under `ray job submit`) or --ray-address, else on an
embedded local Ray. Presets: {", ".join(PRESETS)}.
Example: alphaset caption --store ./store --model llava-1.5-7b --workers 8 --batch-size 32"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "caption",
        help="dense captions with LLaVA (or any image-text-to-text model) on Ray actors",
        description="Caption every image of a store with a vision-language model, one shard per task.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--store", required=True, help="store directory or fsspec URL")
    p.add_argument("--model", default="tiny", help="preset name or model folder (default: tiny)")
    p.add_argument(
        "--tag", default=None, help="output name under captions/ (default: preset or folder name)"
    )
    p.add_argument(
        "--prompt", default=DEFAULT_PROMPT, help=f"user prompt (default: {DEFAULT_PROMPT!r})"
    )
    p.add_argument(
        "--prompt-with-alt",
        action="store_true",
        help="insert each image's alt-text as PixArt does: 'Given the caption of this image \"…\", …'",
    )
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=256,
        help="caption length limit in tokens (default 256)",
    )
    p.add_argument(
        "--max-side",
        type=positive_int,
        default=1024,
        help="downsize larger images before the processor (default 1024)",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=8, help="images per generate call (default 8)"
    )
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="auto: bfloat16/float16 on GPU, float32 on CPU",
    )
    p.add_argument(
        "--cache",
        choices=CACHES,
        default="dynamic",
        help="KV cache; static compiles the forward on GPU",
    )
    p.add_argument(
        "--sort-window",
        type=positive_int,
        default=8,
        help="batches read ahead and ordered by prompt length, so a batch pads little (default 8; 1: shard order)",
    )
    add_stage_flags(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from .run import caption_store

    summary = caption_store(
        args.store,
        args.model,
        tag=args.tag,
        prompt=args.prompt,
        prompt_with_alt=args.prompt_with_alt,
        max_new_tokens=args.max_new_tokens,
        max_side=args.max_side,
        batch_size=args.batch_size,
        dtype=args.dtype,
        cache=args.cache,
        sort_window=args.sort_window,
        **stage_args(args),
    )
    print("\n".join(summary.lines()))
    return 0 if summary.ok else 1
