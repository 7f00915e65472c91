"""Ingest source: existing WebDataset tars (e.g. img2dataset output) with .txt captions and .json metadata.

A sample is the run of consecutive tar members sharing a key (the member path up to the first dot
of its base name, as in `webdataset`). Members are read as bytes and never extracted to disk; a
member with an absolute or ``..`` path, a link, device or FIFO member (or a folder named like an
image), a sample without an image, and a tar that cannot be read to the end each become error
rows, and the rest of the source is still ingested.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
from collections.abc import Callable, Iterator

import braceexpand

from pipeline import fs
from pipeline.ingest.folder import SourceError
from pipeline.ingest.writer import RawSample, make_key
from pipeline.store import check_member_name

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
_IMAGE_SUFFIXES = tuple(f".{e}" for e in IMAGE_EXTS)
_MEMBER_KINDS = {
    tarfile.DIRTYPE: "folder",
    tarfile.FIFOTYPE: "FIFO",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.CONTTYPE: "contiguous file",
}

EPILOG = """\
Reads: WebDataset tars (<key>.jpg|jpeg|png|webp, <key>.txt caption, <key>.json metadata).
Writes: STORE/images/NNNNNN.tar, STORE/meta/NNNNNN.parquet (+ _status), STORE/manifest.json.
Re-running on the same tars adds nothing.
Example: alphaset ingest wds 'laion/{00000..00009}.tar' --store ./store --max-side 1024"""


def expand_tars(spec: str) -> list[str]:
    """The tar files ``spec`` names: a brace pattern, one tar, or a folder of tars (sorted).

    Raises `SourceError` when nothing matches or a named tar is missing.
    """
    if fs.exists(spec) and not spec.endswith(".tar") and _isdir(spec):
        tars = [fs.join(spec, n) for n in fs.ls(spec, ".tar") if not n.startswith((".", "_"))]
        if not tars:
            raise SourceError(f"no .tar files in folder {spec}")
        return [_absolute(t) for t in tars]
    tars = list(braceexpand.braceexpand(spec))
    missing = [t for t in tars if not fs.exists(t)]
    if missing:
        more = f" (and {len(missing) - 1} more of {len(tars)})" if len(missing) > 1 else ""
        raise SourceError(f"no such tar: {missing[0]}{more}")
    folders = [t for t in tars if _isdir(t)]
    if folders:
        raise SourceError(f"{folders[0]} is a folder; give the folder alone or a tar pattern")
    return [_absolute(t) for t in tars]


def _isdir(url: str) -> bool:
    fsys, path = fs.filesystem(url)
    return fsys.isdir(path)


def _absolute(url: str) -> str:
    return os.path.abspath(url) if fs.is_local(url) and "://" not in url else url


def wds_samples(spec: str) -> Iterator[RawSample]:
    """Every sample of the tars ``spec`` names, in tar order. Paths are checked now, tars read lazily."""
    tars = expand_tars(spec)
    return _samples(tars)


def _samples(tars: list[str]) -> Iterator[RawSample]:
    for tar in tars:
        yield from tar_samples(tar)


def tar_samples(tar: str, kind: str = "wds") -> Iterator[RawSample]:
    """The samples of one tar; ``kind`` is part of every key's identity."""
    name = tar.rstrip("/").rsplit("/", 1)[-1]
    try:
        for member_key, files, problem in _group_members(tar):
            path = f"{name}/{member_key}"
            key = make_key(member_key.rsplit("/", 1)[-1], f"{kind}:{tar}:{member_key}")
            if problem:
                yield RawSample(key=key, path=path, error=problem)
            else:
                yield sample_from_files(key, path, files)
    except (tarfile.TarError, OSError, EOFError) as e:
        # Samples read so far are kept; the tar itself is counted as one error row.
        yield RawSample(
            key=make_key(name.split(".", 1)[0], f"{kind}-unreadable:{tar}"),
            path=name,
            error=f"unreadable tar: {type(e).__name__}: {e}",
        )


def _group_members(tar: str) -> Iterator[tuple[str, dict[str, bytes], str | None]]:
    """Yield ``(member_key, {ext: bytes}, problem)`` for consecutive members sharing a key.

    An unsafe member name yields one problem entry (its data is never read) and does not stop
    the tar: the other samples are still good.
    """
    with fs.open_read(tar) as raw, tarfile.open(fileobj=raw, mode="r|*") as tf:
        current: str | None = None
        files: dict[str, bytes] = {}
        for member in tf:
            problem = None
            if member.issym() or member.islnk():
                problem = f"unsafe tar member: link {member.name!r} -> {member.linkname!r}"
            elif member.isdir() and not member.name.rstrip("/").lower().endswith(_IMAGE_SUFFIXES):
                continue  # plain folders
            elif not member.isfile():
                kind = _MEMBER_KINDS.get(member.type, f"type {member.type!r}")
                problem = f"tar member not a regular file: {kind} {member.name!r}"
            try:
                check_member_name(member.name)
            except ValueError as e:
                problem = f"unsafe tar member: {e}"
            if problem:
                if current is not None:
                    yield current, files, None
                    current, files = None, {}
                yield member.name.lstrip("/\\"), {}, problem
                continue
            base = member.name.rsplit("/", 1)[-1]
            if "." not in base or base.startswith("."):
                continue
            stem, ext = base.split(".", 1)
            key = member.name[: len(member.name) - len(base)] + stem
            if key != current:
                # Yield the finished sample before reading on: a tar cut short keeps it.
                if current is not None:
                    yield current, files, None
                current, files = key, {}
            files[ext.lower()] = tf.extractfile(member).read()  # type: ignore[union-attr]
        if current is not None:
            yield current, files, None


def sample_from_files(key: str, path: str, files: dict[str, bytes]) -> RawSample:
    """A RawSample from one WebDataset sample's members: image, .txt caption, .json metadata."""
    ext = next((e for e in IMAGE_EXTS if e in files), None)
    meta: dict | None = None
    problem = None
    if "json" in files:
        try:
            meta = json.loads(files["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                meta = {"value": meta}
        except (UnicodeDecodeError, ValueError) as e:
            problem = f"malformed json sidecar: {e}"
    alt_text = None
    if "txt" in files:
        alt_text = files["txt"].decode("utf-8", errors="replace").strip() or None
    elif meta and isinstance(meta.get("caption"), str):
        alt_text = meta["caption"].strip() or None
    url = meta.get("url") if meta and isinstance(meta.get("url"), str) else None
    if problem:
        meta = {**(meta or {}), "sidecar_problem": problem}
    if ext is None:
        # The member list goes to source_meta so the reason stays one summary category.
        meta = {**(meta or {}), "members": sorted(files)}
        return RawSample(
            key=key,
            path=path,
            url=url,
            alt_text=alt_text,
            source_meta=meta,
            error="no image in sample (expected jpg, jpeg, png or webp)",
        )
    return RawSample(
        key=key, path=f"{path}.{ext}", data=files[ext], url=url, alt_text=alt_text, source_meta=meta
    )


def _run(args: argparse.Namespace, run_ingest: Callable) -> int:
    samples = wds_samples(args.src)
    return run_ingest(args, "wds", samples, {"src": args.src})


def register_source(
    src: argparse._SubParsersAction, add_common: Callable, run_ingest: Callable
) -> None:
    p = src.add_parser(
        "wds",
        help="existing WebDataset tars, e.g. img2dataset output ('DIR/{00000..00009}.tar', a tar or a folder)",
        description="Ingest existing WebDataset tars; captions (.txt) and metadata (.json) are carried over.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "src",
        help="a brace pattern 'DIR/{000000..000009}.tar', one .tar, or a folder of .tar files",
    )
    add_common(p)
    p.set_defaults(func=lambda args: _run(args, run_ingest))
