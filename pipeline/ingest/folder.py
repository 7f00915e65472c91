"""Ingest source: a folder tree of image files with optional `<name>.txt` / `<name>.json` sidecars."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

from pipeline.images import IMAGE_SUFFIXES
from pipeline.ingest.writer import IngestConfig, IngestSummary, RawSample, ingest, make_key
from pipeline.store import Store


class SourceError(Exception):
    """A source that cannot be read at all (wrong path, wrong format): a one-line CLI error."""


def read_sidecars(image_path: str) -> tuple[str | None, dict | None, str | None]:
    """Return (alt_text, source_meta, problem) from `<stem>.txt` and `<stem>.json` beside an image."""
    stem = os.path.splitext(image_path)[0]
    alt_text = meta = problem = None
    if os.path.isfile(stem + ".txt"):
        try:
            with open(stem + ".txt", encoding="utf-8", errors="replace") as f:
                alt_text = f.read().strip() or None
        except OSError as e:
            problem = f"unreadable caption sidecar: {e.strerror}"
    if os.path.isfile(stem + ".json"):
        try:
            with open(stem + ".json", encoding="utf-8") as f:
                meta = json.load(f)
            if not isinstance(meta, dict):
                meta = {"value": meta}
        except (OSError, ValueError) as e:
            # A bad sidecar must not cost the image: keep the image, note the problem.
            problem = f"malformed json sidecar: {e}"
    return alt_text, meta, problem


def folder_samples(src: str, label_from_dir: bool = False) -> Iterator[RawSample]:
    """Every image under ``src`` (recursive, sorted, deterministic); unreadable folders become error samples.

    The path is checked now (a `SourceError`), the tree is walked lazily.
    """
    if not os.path.exists(src):
        raise SourceError(f"no such folder: {src}")
    if not os.path.isdir(src):
        raise SourceError(f"not a folder: {src} (for a tar use 'alphaset ingest wds')")
    return _walk(os.path.abspath(src), label_from_dir)


def ingest_folder(
    store: Store | str,
    src: str,
    label_from_dir: bool = False,
    progress: bool = True,
    **config: Any,
) -> IngestSummary:
    """`alphaset ingest folder` as a call: the images under ``src`` into ``store``; ``config``
    are `IngestConfig` fields (``shard_size``, ``max_side``, ``workers`` …)."""
    src = str(src)
    return ingest(
        store if isinstance(store, Store) else Store(store),
        folder_samples(src, label_from_dir=label_from_dir),
        "folder",
        IngestConfig(**config),
        settings={"src": src, "label_from_dir": label_from_dir},
        progress=progress,
    )


def _walk(root: str, label_from_dir: bool) -> Iterator[RawSample]:
    problems: list[tuple[str, str]] = []

    def onerror(e: OSError) -> None:
        problems.append((e.filename or "?", e.strerror or str(e)))

    for dirpath, dirnames, filenames in os.walk(root, onerror=onerror):
        # Folders os.walk could not list become error rows, so the summary counts them.
        yield from _unreadable(root, problems)
        dirnames.sort()
        for name in sorted(filenames):
            if not name.lower().endswith(IMAGE_SUFFIXES) or name.startswith("."):
                continue
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            alt_text, meta, problem = read_sidecars(full)
            if problem:
                meta = {**(meta or {}), "sidecar_problem": problem}
            label = os.path.basename(dirpath) if label_from_dir and dirpath != root else None
            yield RawSample(
                key=make_key(os.path.splitext(name)[0], f"folder:{root}:{rel}"),
                path=printable(rel),
                file=full,
                alt_text=alt_text,
                label=printable(label) if label else None,
                source_meta=meta,
            )
    # The last folder os.walk tried to list may have failed after the final yield.
    yield from _unreadable(root, problems)


def _unreadable(root: str, problems: list[tuple[str, str]]) -> Iterator[RawSample]:
    while problems:
        path, why = problems.pop(0)
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        yield RawSample(
            key=make_key(os.path.basename(path), f"folder-unreadable:{root}:{rel}"),
            path=printable(rel) + "/",
            error=f"unreadable directory: {why}",
        )


def printable(name: str) -> str:
    """A file name as valid UTF-8 text for the meta table.

    POSIX names are bytes; Python keeps undecodable ones as lone surrogates, which Parquet and
    JSON cannot store. Those bytes are shown as U+FFFD; the key still hashes the exact name.
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
