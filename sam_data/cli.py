"""`alphaset sam download|captions`: the command-line side of the SA-1B downloader and the caption
import (`alphaset ingest sam` is registered by `sam_data.ingest`)."""

from __future__ import annotations

import argparse

from pipeline.errors import UserError

DOWNLOAD_EPILOG = """\
Reads: the SA-1B links file from Meta (file_name<TAB>cdn_link; rows that are not sa_NNNNNN.tar
  are ignored) and, with --md5, an md5sum-format list ('<md5>  sa_NNNNNN.tar').
Writes: DIR/sa_NNNNNN.tar (only once complete and verified: md5, else the tar read to its end),
  DIR/sa_NNNNNN.tar.part while downloading (kept on failure; the next run resumes it with HTTP
  Range), DIR/.sa_NNNNNN.tar.verified (lets a re-run skip verified files).
Exit status 1 if any file failed (an md5 mismatch deletes the file).
Example: alphaset sam download sa1b_links.txt --out ./sa1b --only sa_000000,sa_000001 \\
           --md5 sa1b_md5.txt --workers 4"""

CAPTIONS_EPILOG = """\
Reads: STORE (its ok images) and PATH: a folder of sa_<id>.txt files (PixArt's
  SAM-LLaVA-Captions10M layout), a .tar/.tar.gz of them, or a parquet/jsonl/csv/tsv table with an
  id column (sa_123, sa_123.jpg or 123) and a caption column.
Writes: STORE/captions/TAG/NNNNNN.parquet (key, caption, model, prompt, n_tokens, truncated,
  error; an image without a caption is an error row 'no caption'), STORE/captions/TAG/_status/.
Shards that already have TAG are skipped: run it again after ingesting more tars.
Example: alphaset sam captions ./SA1B_caption --store ./store --tag sam-llava"""


def register(sub: argparse._SubParsersAction) -> None:
    from sam_data.captions import DEFAULT_MODEL, DEFAULT_TAG

    p = sub.add_parser(
        "sam",
        help="SA-1B: download tars, import dense captions",
        description="SA-1B tools. Ingest the tars with 'alphaset ingest sam'.",
    )
    cmds = p.add_subparsers(dest="sam_command", metavar="SUBCOMMAND", parser_class=type(p))
    cmds.required = True

    d = cmds.add_parser(
        "download",
        help="download SA-1B tars from the links file (resumable, verified)",
        description="Download SA-1B tars listed in Meta's links file.",
        epilog=DOWNLOAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("links", help="the links file (file_name<TAB>cdn_link)")
    d.add_argument("--out", required=True, help="folder for the tars (created if missing)")
    d.add_argument(
        "--only", default=None, help="comma-separated names to fetch, e.g. sa_000000,sa_000001"
    )
    d.add_argument(
        "--md5", default=None, metavar="FILE", help="md5sum-format checklist to verify against"
    )
    d.add_argument("--workers", type=int, default=4, help="files downloaded at once (default 4)")
    d.add_argument(
        "--retries",
        type=int,
        default=5,
        help="failed attempts in a row without progress before a file is given up (default 5)",
    )
    d.add_argument(
        "--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)"
    )
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_download)

    c = cmds.add_parser(
        "captions",
        help="import dense captions keyed by SA id into captions/<TAG>/",
        description="Import existing captions of SA-1B images as a caption stage.",
        epilog=CAPTIONS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    c.add_argument(
        "path", help="folder of sa_<id>.txt, .tar[.gz] of them, or parquet/jsonl/csv/tsv"
    )
    c.add_argument("--store", required=True, help="store directory or fsspec URL")
    c.add_argument(
        "--tag", default=DEFAULT_TAG, help=f"captions/<TAG> to write (default {DEFAULT_TAG})"
    )
    c.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model name recorded with the captions (default {DEFAULT_MODEL!r})",
    )
    c.add_argument(
        "--id-column",
        default=None,
        help="id column of a table (default: key, id, image_id, file_name …)",
    )
    c.add_argument(
        "--caption-column",
        default=None,
        help="caption column of a table (default: caption, text …)",
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=_captions)


def _download(args: argparse.Namespace) -> int:
    from sam_data.download import download

    only = [s for s in args.only.split(",") if s.strip()] if args.only is not None else None
    if only is not None and not only:
        raise UserError("--only is empty; give names like sa_000000,sa_000001")
    summary = download(
        args.links,
        args.out,
        only=only,
        md5_path=args.md5,
        workers=args.workers,
        retries=args.retries,
        timeout=args.timeout,
        progress=not args.no_progress,
    )
    print("\n".join(summary.lines()))
    return 1 if summary.failed else 0


def _captions(args: argparse.Namespace) -> int:
    from sam_data.captions import import_captions

    result = import_captions(
        args.store,
        args.path,
        tag=args.tag,
        model=args.model,
        id_column=args.id_column,
        caption_column=args.caption_column,
        progress=not args.no_progress,
    )
    print("\n".join(result.lines()))
    return 1 if result.stage.failed else 0
