"""`alphaset ingest …`: the command-line side of every ingest source."""

from __future__ import annotations

import argparse
import importlib

from pipeline.cli import positive_int
from pipeline.images import DEFAULT_MAX_PIXELS
from pipeline.ingest.writer import IngestConfig, ingest
from pipeline.store import Store

EPILOG = """\
Reads: the source.  Writes: STORE/images/NNNNNN.tar, STORE/meta/NNNNNN.parquet,
STORE/_status/ingest/NNNNNN.json, STORE/manifest.json.  Re-running on the same source adds
nothing; new files go to new shards; --retry-errors reads the error rows' sources again.
One ingest at a time per store (a second is refused, naming the first); stage runs go on beside it.
Example: alphaset ingest folder ./photos --store ./store --max-side 1024 --workers 4"""


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store", required=True, help="store directory or fsspec URL (created if missing)"
    )
    p.add_argument(
        "--shard-size", type=positive_int, default=1000, help="samples per shard (default 1000)"
    )
    p.add_argument(
        "--max-side",
        type=positive_int,
        default=None,
        help="downsize so the long side is at most PX (never upsizes)",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="parallel decode/encode processes (default 1)",
    )
    p.add_argument(
        "--quality",
        type=positive_int,
        default=95,
        help="JPEG quality of re-encoded images (default 95)",
    )
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"reject images above this many pixels, decompression bombs (default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument(
        "--retry-errors",
        action="store_true",
        help="read the sources of the store's error rows again and replace those rows",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from(args: argparse.Namespace) -> IngestConfig:
    return IngestConfig(
        shard_size=args.shard_size,
        max_side=args.max_side,
        workers=args.workers,
        quality=args.quality,
        max_pixels=args.max_pixels,
    )


def run_ingest(args: argparse.Namespace, source: str, samples, settings: dict | None = None) -> int:
    """Shared tail of every `ingest` subcommand: write shards, print the summary."""
    cfg = config_from(args)
    summary = ingest(
        Store(args.store),
        samples,
        source,
        cfg,
        settings=settings,
        progress=not args.no_progress,
        retry_errors=args.retry_errors,
    )
    print("\n".join(summary.lines()))
    return 0


def _folder(args: argparse.Namespace) -> int:
    from pipeline.ingest.folder import folder_samples

    samples = folder_samples(args.src, label_from_dir=args.label_from_dir)
    return run_ingest(
        args, "folder", samples, {"src": args.src, "label_from_dir": args.label_from_dir}
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="add images to a store (folder, wds, urls, sam, pixart)",
        description="Add images to a store.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_subparsers(dest="source", metavar="SOURCE")
    src.required = True
    f = src.add_parser(
        "folder",
        help="a folder tree of images (+ <name>.txt caption, <name>.json metadata sidecars)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    f.add_argument("src", help="folder to scan recursively (jpg, jpeg, png, webp, bmp, tiff)")
    f.add_argument(
        "--label-from-dir",
        action="store_true",
        help="record the parent folder name as the class label",
    )
    add_common(f)
    f.set_defaults(func=_folder)
    # Other sources register their own subparser: module.register_source(src, add_common, run_ingest)
    from pipeline.ingest import SOURCES

    for name, module_name in SOURCES.items():
        if name == "folder":
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue
            raise
        module.register_source(src, add_common, run_ingest)
