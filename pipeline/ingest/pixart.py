"""Ingest source: an existing PixArt-format dataset (``data_info.json`` + an image root).

``data_info.json`` is a JSON list of entries ``{"path", "prompt", "width", "height", "ratio", …}``
with ``path`` relative to the image root; the prompt becomes the original caption (``alt_text``),
the other fields go to ``source_meta``. Files in the wild spell ``ratio`` as ``ration``; that is
accepted and recorded as ``ratio``. A missing file, an entry without a path, or a path leaving
the root becomes an error row; the other entries are still ingested.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator

from pipeline.ingest.folder import SourceError, printable
from pipeline.ingest.writer import RawSample, make_key

EPILOG = """\
Reads: DATA_INFO.json (a list of {path, prompt, width, height, ratio}) and the images under --root.
Writes: STORE/images/, STORE/meta/ (prompt kept as alt_text), STORE/manifest.json.
Example: alphaset ingest pixart InternData/data_info.json --root InternImgs --store ./store"""


def load_data_info(path: str) -> list:
    """The entries of a data_info.json file; a `SourceError` if it is not a JSON list."""
    if not os.path.isfile(path):
        raise SourceError(f"no such data_info file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)
    except (UnicodeDecodeError, ValueError) as e:
        raise SourceError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(entries, list):
        raise SourceError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    return entries


def pixart_samples(data_info: str, root: str) -> Iterator[RawSample]:
    """One sample per entry of ``data_info``, in file order; the file and root are checked now."""
    entries = load_data_info(data_info)
    if not os.path.isdir(root):
        raise SourceError(f"no such image root folder: {root}")
    return _samples(entries, os.path.abspath(root))


def _samples(entries: list, root: str) -> Iterator[RawSample]:
    for i, entry in enumerate(entries):
        yield entry_sample(i, entry, root)


def entry_sample(index: int, entry: object, root: str) -> RawSample:
    """The RawSample for one data_info entry (an error sample when the entry is unusable)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str) or not entry["path"]:
        return RawSample(
            key=make_key(f"entry{index}", f"pixart-entry:{root}:{index}"),
            path=f"#{index}",
            error="malformed entry: no 'path' string",
            source_meta={"entry": entry} if isinstance(entry, dict) else {"value": entry},
        )
    rel = entry["path"]
    key = make_key(os.path.splitext(os.path.basename(rel))[0], f"pixart:{root}:{rel}")
    prompt = entry.get("prompt")
    meta = {k: v for k, v in entry.items() if k not in ("path", "prompt")}
    if "ratio" not in meta and "ration" in meta:
        meta["ratio"] = meta["ration"]
    common = {
        "key": key,
        "path": printable(rel),
        "alt_text": prompt.strip() or None if isinstance(prompt, str) else None,
        "source_meta": meta or None,
    }
    parts = rel.replace("\\", "/").split("/")
    if os.path.isabs(rel) or ".." in parts:
        return RawSample(error="unsafe path: absolute or '..' (must stay under --root)", **common)
    full = os.path.join(root, rel)
    if not os.path.isfile(full):
        return RawSample(error="missing file", **common)
    return RawSample(file=full, **common)


def _run(args: argparse.Namespace, run_ingest: Callable) -> int:
    samples = pixart_samples(args.src, args.root)
    return run_ingest(args, "pixart", samples, {"src": args.src, "root": args.root})


def register_source(
    src: argparse._SubParsersAction, add_common: Callable, run_ingest: Callable
) -> None:
    p = src.add_parser(
        "pixart",
        help="a PixArt data_info.json (path, prompt, width, height, ratio) + its image root",
        description="Ingest a PixArt-format dataset; prompts are kept as the original caption.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="the data_info.json file")
    p.add_argument("--root", required=True, help="folder the entries' paths are relative to")
    add_common(p)
    p.set_defaults(func=lambda args: _run(args, run_ingest))
