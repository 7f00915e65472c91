"""`alphaset ingest sam`: SA-1B tars or extracted folders as raw samples keyed ``sa_<image_id>``.

An SA-1B tar holds ``sa_<id>.jpg`` + ``sa_<id>.json`` pairs. The image goes to the store; of the
annotation json only the small ``"image"`` dict is kept (as source_meta) and the number of masks
(``n_masks``), never the masks themselves. Decisions for incomplete pairs:

- a jpg without its json is ingested (n_masks null, ``annotation_problem`` in source_meta): for
  text-to-image training the photo is what matters;
- a json without its jpg is an error row ``missing image``;
- a malformed json keeps the image, like a jpg without json;
- a tar member with an absolute or ``..`` path is an error row and is never read;
- a tar that breaks part-way yields what it held so far, a ``truncated tar member`` row for a
  sample cut in two, and one ``unreadable tar`` row for the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.ingest.folder import SourceError
from pipeline.ingest.writer import RawSample, make_key
from pipeline.store import Store, check_member_name

log = logging.getLogger(__name__)

_ID = re.compile(r"^(?:sa_)?0*(\d+)$")
_IMAGE_EXTS = ("jpg", "jpeg")


def sa_key(value: Any) -> str | None:
    """Normalise an SA-1B id (``sa_123``, ``sa_123.jpg``, ``dir/sa_123.txt``, ``123``, 123) to
    the store key ``sa_123``; None when it is not one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return f"sa_{value}" if value >= 0 else None
    base = str(value).strip().replace("\\", "/").rsplit("/", 1)[-1]
    stem = base.split(".", 1)[0]
    m = _ID.match(stem)
    if not m:
        return None
    return f"sa_{int(m.group(1))}"


def sam_samples(srcs: list[str]) -> Iterator[RawSample]:
    """Raw samples from SA-1B tars, folders of tars, or extracted folders, in a fixed order.

    Paths are checked now (a `SourceError` names the bad one); files are read lazily.
    """
    if not srcs:
        raise SourceError("give at least one SA-1B tar or folder")
    plan: list[tuple[str, str]] = []
    for src in srcs:
        if not os.path.exists(src):
            raise SourceError(f"no such file or folder: {src}")
        if os.path.isdir(src):
            plan.append(("dir", os.path.abspath(src)))
        elif src.endswith(".tar"):
            if not tarfile.is_tarfile(src):
                raise SourceError(f"not a tar file: {src}")
            plan.append(("tar", os.path.abspath(src)))
        else:
            raise SourceError(f"not an SA-1B tar (sa_NNNNNN.tar) or folder: {src}")
    return _iterate(plan)


def _iterate(plan: list[tuple[str, str]]) -> Iterator[RawSample]:
    for kind, path in plan:
        if kind == "tar":
            yield from tar_samples(path)
        else:
            yield from folder_samples(path)


def folder_samples(root: str) -> Iterator[RawSample]:
    """A folder: loose ``sa_<id>.jpg/.json`` pairs, then every ``sa_*.tar`` under it (sorted).

    Other tars are not SA-1B tars (a store inside the folder holds ``000000.tar`` files); name
    such a tar on the command line to ingest it anyway.
    """
    tars: list[str] = []
    unfinished = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        loose: dict[str, dict[str, str]] = {}
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            if name.startswith("sa_") and name.endswith(".tar"):
                tars.append(full)
                continue
            if name.endswith(".tar.part"):
                unfinished += 1
                continue
            stem, _, ext = name.partition(".")
            ext = ext.lower()
            key = sa_key(stem) if stem.startswith("sa_") else None
            if key is None or (ext not in _IMAGE_EXTS and ext != "json"):
                continue  # not an SA-1B file (links files, md5 lists, captions …)
            loose.setdefault(key, {})["json" if ext == "json" else "jpg"] = full
        for key, files in loose.items():
            yield _loose_sample(root, key, files)
    if unfinished:
        log.warning("%s: skipped %d unfinished download(s) (*.tar.part)", root, unfinished)
    for tar in sorted(tars):
        yield from tar_samples(tar)


def _loose_sample(root: str, key: str, files: dict[str, str]) -> RawSample:
    image = files.get("jpg")
    rel = os.path.relpath(image or files["json"], root).replace(os.sep, "/")
    annotation: bytes | None = None
    problem = None
    if "json" in files:
        try:
            with open(files["json"], "rb") as f:
                annotation = f.read()
        except OSError as e:
            problem = f"unreadable annotation json: {e.strerror or e}"
    return _make_sample(key, rel, image_file=image, annotation=annotation, problem=problem)


def tar_samples(path: str) -> Iterator[RawSample]:
    """The samples of one SA-1B tar. Pairs are matched by key, whatever the member order."""
    tarname = os.path.basename(path)
    pending: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        tar = tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError) as e:
        yield _tar_error(path, f"unreadable tar: {e}")
        return
    with tar:
        members = iter(tar)
        while True:
            try:
                member = next(members)
            except StopIteration:
                break
            except (tarfile.TarError, OSError) as e:
                # Keep what was read; one error row says the rest of the tar is lost.
                yield from (_tar_pair(tar, tarname, k, m) for k, m in pending.items())
                yield _tar_error(path, f"unreadable tar: {e} (after {tar.offset} bytes)")
                return
            if not member.isfile():
                continue
            try:
                check_member_name(member.name)
            except ValueError:
                yield RawSample(
                    key=make_key(
                        member.name.rsplit("/", 1)[-1], f"sam-unsafe:{path}:{member.name}"
                    ),
                    path=f"{tarname}:{member.name}",
                    error="unsafe tar member: absolute or '..' path, not read",
                )
                continue
            base = member.name.rsplit("/", 1)[-1]
            stem, _, ext = base.partition(".")
            ext = ext.lower()
            key = sa_key(stem) if stem.startswith("sa_") else None
            if key is None or (ext not in _IMAGE_EXTS and ext != "json"):
                yield RawSample(
                    key=make_key(stem, f"sam-other:{path}:{member.name}"),
                    path=f"{tarname}:{member.name}",
                    error="unexpected tar member: not sa_<id>.jpg or sa_<id>.json",
                )
                continue
            files = pending.setdefault(key, {})
            files["json" if ext == "json" else "jpg"] = member
            if len(files) == 2:
                yield _tar_pair(tar, tarname, key, pending.pop(key))
        for key, files in pending.items():
            yield _tar_pair(tar, tarname, key, files)


def _tar_pair(
    tar: tarfile.TarFile, tarname: str, key: str, files: dict[str, tarfile.TarInfo]
) -> RawSample:
    member = files.get("jpg") or files["json"]
    where = f"{tarname}:{member.name}"
    try:
        image = _read(tar, files["jpg"]) if "jpg" in files else None
        annotation = _read(tar, files["json"]) if "json" in files else None
    except (tarfile.TarError, OSError) as e:
        return RawSample(key=key, path=where, error=f"truncated tar member: {e}")
    return _make_sample(key, where, image_data=image, annotation=annotation, extra={"tar": tarname})


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    if f is None:
        raise tarfile.ReadError(f"{member.name} has no data")
    return f.read()


def _tar_error(path: str, reason: str) -> RawSample:
    return RawSample(
        key=make_key(os.path.basename(path), f"sam-tar:{path}"),
        path=os.path.basename(path),
        error=reason,
    )


def _make_sample(
    key: str,
    path: str,
    image_data: bytes | None = None,
    image_file: str | None = None,
    annotation: bytes | None = None,
    problem: str | None = None,
    extra: dict[str, Any] | None = None,
) -> RawSample:
    image_id = int(key[3:])
    meta: dict[str, Any] = dict(extra or {})
    n_masks = None
    if annotation is not None:
        info, n_masks, problem = parse_annotation(annotation, image_id)
        meta.update(info)
    elif problem is None:
        problem = "no annotation json"
    if problem:
        meta["annotation_problem"] = problem
    if image_data is None and image_file is None:
        return RawSample(
            key=key,
            path=path,
            image_id=image_id,
            n_masks=n_masks,
            source_meta=meta,
            error="missing image: annotation json without a jpg",
        )
    return RawSample(
        key=key,
        path=path,
        data=image_data,
        file=image_file,
        image_id=image_id,
        n_masks=n_masks,
        source_meta=meta,
    )


def parse_annotation(data: bytes, image_id: int) -> tuple[dict[str, Any], int | None, str | None]:
    """(the json's ``image`` dict, number of masks, problem) from an SA-1B annotation file."""
    try:
        doc = json.loads(data)
    except ValueError as e:
        return {}, None, f"malformed annotation json: {e}"
    if not isinstance(doc, dict):
        return {}, None, "malformed annotation json: not an object"
    image = doc.get("image") if isinstance(doc.get("image"), dict) else {}
    anns = doc.get("annotations")
    n_masks = len(anns) if isinstance(anns, list) else None
    problem = None
    if n_masks is None:
        problem = "malformed annotation json: no 'annotations' list"
    elif not image:
        problem = "malformed annotation json: no 'image' object"
    elif image.get("image_id") not in (None, image_id):
        problem = f"image_id {image.get('image_id')} in the json differs from the file name"
    return image, n_masks, problem


def register_source(
    src: argparse._SubParsersAction,
    add_common: Callable[[argparse.ArgumentParser], None],
    run_ingest: Callable[..., int],
) -> None:
    from sam_data.captions import DEFAULT_MODEL, DEFAULT_TAG

    p = src.add_parser(
        "sam",
        help="SA-1B tars (sa_NNNNNN.tar) or extracted folders; --captions imports dense captions",
        description="Add SA-1B images to a store, keyed sa_<image_id>; meta keeps image_id and "
        "n_masks, source_meta the annotation's 'image' record (never the masks).",
        epilog=(
            "Reads: sa_NNNNNN.tar files, folders of them, or extracted sa_<id>.jpg/.json folders;\n"
            "  with --captions, sa_<id>.txt files (folder or .tar[.gz]) or a parquet/jsonl/csv table.\n"
            "Writes: STORE/images/, STORE/meta/, with --captions STORE/captions/TAG/.\n"
            "A jpg without its json is kept (n_masks null); a json without its jpg is an error row.\n"
            "Example: alphaset ingest sam ./sa1b --store ./store --max-side 1024 \\\n"
            "           --captions ./SA1B_caption --caption-tag sam-llava"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", nargs="+", help="SA-1B tar file(s) and/or folder(s)")
    p.add_argument(
        "--captions", metavar="PATH", help="import dense captions keyed by SA id after ingesting"
    )
    p.add_argument(
        "--caption-tag",
        default=DEFAULT_TAG,
        help=f"captions/<TAG> to write (default {DEFAULT_TAG})",
    )
    p.add_argument(
        "--caption-model",
        default=DEFAULT_MODEL,
        help=f"model name recorded with the imported captions (default {DEFAULT_MODEL!r})",
    )
    add_common(p)
    p.set_defaults(func=lambda args: _run(args, run_ingest))


def _run(args: argparse.Namespace, run_ingest: Callable[..., int]) -> int:
    from sam_data.captions import check_caption_source, check_tag, import_captions

    samples = sam_samples(args.src)
    if args.captions:  # fail before the ingest, not after it
        check_tag(args.caption_tag)
        check_caption_source(args.captions)
    settings = {"src": [os.path.abspath(s) for s in args.src]}
    rc = run_ingest(args, "sam", samples, settings)
    if args.captions:
        result = import_captions(
            Store(args.store),
            args.captions,
            tag=args.caption_tag,
            model=args.caption_model,
            progress=not args.no_progress,
        )
        print("\n".join(result.lines()))
    return rc
