"""Ingest source: an existing PixArt-format dataset (``data_info.json`` + an image root).

``data_info.json`` is a JSON list of entries ``{"path", "prompt", "width", "height", "ratio", …}``
with ``path`` relative to the image root; the ``--caption-field`` (``prompt``, or PixArt-Σ's
``sharegpt4v``) becomes the original caption (``alt_text``), the other fields go to
``source_meta``. Files in the wild spell ``ratio`` as ``ration``; that is accepted and recorded as
``ratio``. A missing file, an entry without a path, or a path leaving the root becomes an error row;
the other entries are still ingested.

``ratio`` (height / width) is what PixArt's datasets filter on: PixArt-α keeps ``ratio <= 4``
(``InternalData``/``InternalDataMS``; PixArt-Σ 4.5). Rows above that are kept here (the feature
stage puts them in the extreme buckets) but noted, and a ``ratio`` that disagrees with the image
file (PIL's size, as PixArt's loader reads it) is noted too: the summary counts both.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator

from PIL import Image

from pipeline.ingest.folder import SourceError, printable
from pipeline.ingest.writer import RawSample, make_key

EPILOG = """\
Reads: DATA_INFO.json (a list of {path, prompt, width, height, ratio}) and the images under --root.
Writes: STORE/images/, STORE/meta/ (prompt kept as alt_text), STORE/manifest.json.
Example: alphaset ingest pixart InternData/data_info.json --root InternImgs --store ./store"""

CAPTION_FIELDS = ("prompt", "sharegpt4v")  # PixArt-α's field; PixArt-Σ's ShareGPT4V captions
PIXART_MAX_RATIO = 4.0  # PixArt-α's InternalData keeps entries with h/w <= 4
RATIO_TOLERANCE = 0.01  # relative: data_info ratios are rounded (e.g. to 3 decimals)


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


def pixart_samples(data_info: str, root: str, caption_field: str = "prompt") -> Iterator[RawSample]:
    """One sample per entry of ``data_info``, in file order; the file and root are checked now."""
    if caption_field not in CAPTION_FIELDS:
        raise SourceError(
            f"--caption-field must be one of {', '.join(CAPTION_FIELDS)}, got {caption_field!r}"
        )
    entries = load_data_info(data_info)
    if not os.path.isdir(root):
        raise SourceError(f"no such image root folder: {root}")
    return _samples(entries, os.path.abspath(root), caption_field)


def _samples(entries: list, root: str, caption_field: str) -> Iterator[RawSample]:
    for i, entry in enumerate(entries):
        yield entry_sample(i, entry, root, caption_field)


def ratio_problems(meta: dict, file: str) -> list[str]:
    """What is wrong with an entry's ``ratio`` without costing its image, most important first.

    The image's size is read from its header only (PIL opens lazily), before the writer decodes it.
    """
    problems = []
    ratio = meta.get("ratio")
    if ratio is not None and not isinstance(ratio, int | float):
        problems.append(f"ratio not a number: {ratio!r}")
        ratio = None
    if ratio is not None and ratio > PIXART_MAX_RATIO:
        problems.append(f"ratio above PixArt-α's limit of 4 (its loader drops the row): {ratio}")
    if ratio is not None:
        try:
            with Image.open(file) as img:
                w, h = img.size
        except (OSError, ValueError, Image.DecompressionBombError):
            w = h = 0  # unreadable: the writer makes it an error row with the reason
        if w and h and abs(ratio / (h / w) - 1) > RATIO_TOLERANCE:
            problems.append(f"ratio mismatch: data_info {ratio}, image h/w {h / w:.3f} ({w}x{h})")
    return problems


def entry_sample(index: int, entry: object, root: str, caption_field: str = "prompt") -> RawSample:
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
    prompt = entry.get(caption_field)
    meta = {k: v for k, v in entry.items() if k not in ("path", caption_field)}
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
    problems = ratio_problems(meta, full)
    if common["alt_text"] is None:
        problems.append(f"no {caption_field!r} caption")
    if problems:
        common["source_meta"] = {**meta, "sidecar_problem": "; ".join(problems)}
    return RawSample(file=full, **common)


def _run(args: argparse.Namespace, run_ingest: Callable) -> int:
    samples = pixart_samples(args.src, args.root, args.caption_field)
    settings = {"src": args.src, "root": args.root, "caption_field": args.caption_field}
    return run_ingest(args, "pixart", samples, settings)


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
    p.add_argument(
        "--caption-field",
        default="prompt",
        choices=CAPTION_FIELDS,
        help="the entry field kept as the caption: prompt (default) or PixArt-Σ's sharegpt4v",
    )
    add_common(p)
    p.set_defaults(func=lambda args: _run(args, run_ingest))
