"""`alphaset manifest show|stats|verify|plot|view …`: the command-line side of pipeline.manifest,
pipeline.views and curation.plots."""

from __future__ import annotations

import argparse

from pipeline import manifest
from pipeline.store import Store

_FMT = argparse.RawDescriptionHelpFormatter

SHOW_EPILOG = """\
Reads: STORE/manifest.json and every status record.  Writes: nothing.
Example: alphaset manifest show --store ./store"""
STATS_EPILOG = """\
Reads: STORE/meta/*.parquet, every scores/<tag> and captions/<tag> table, status records.
Writes: nothing.
Example: alphaset manifest stats --store ./store --json > stats.json"""
VERIFY_EPILOG = """\
Reads: every file of the store (images, meta, every stage output, status records, views).
Writes: nothing.  Exits 1 when it finds a problem (files without a status record are warnings);
every problem names its file.  'alphaset manifest repair' fixes what can be fixed.
Example: alphaset manifest verify --store ./store --decode"""
REPAIR_EPILOG = """\
Reads: every status record and the files they vouch for (checksums), manifest.json.
Writes: STORE/manifest.json (rebuilt from the status records); moves aside to STORE/_quarantine/<time>/
shard files without a status record, temp files of interrupted writes, unreadable status records,
and the records and files of shards that fail their checksum (so the next run of that stage, or
ingest from its source, redoes them). Takes every writer lease first (refused while a writer runs).
Prints what it did.  Nothing is deleted that a reader could use: _quarantine/ is yours to inspect.
Example: alphaset manifest repair --store ./store && alphaset manifest verify --store ./store"""
PLOT_EPILOG = """\
Reads: meta, scores/<tag>, captions/<tag>, images/*.tar (contact sheets).
Writes: DIR/*.png (histograms, top/bottom contact sheets).
Example: alphaset manifest plot --store ./store --out ./plots --captions llava-1.5-7b"""
VIEW_EPILOG = """\
Reads: meta, every scores/<tag> (incl. scores/dedup), one captions/<tag>.
Writes: STORE/views/NAME.parquet (key, shard; the expression, tags and counts in its metadata).
The expression is SQL over the joined columns (an unknown name lists them); min(a, b), max(a, b) work.
Examples (the three PixArt-alpha stages):
  # 1. pixel dependencies: class-conditional, ImageNet-style tree ingested with --label-from-dir
  alphaset manifest view create stage1 --store S --where 'label is not null and min(width, height) >= 256 and dup_of is null'
  # 2. text-image alignment: SA-1B with dense LLaVA captions
  alphaset manifest view create stage2 --store S --captions llava-1.5-7b --where "source = 'sam' and caption is not null and dup_of is null"
  # 3. high aesthetics at high resolution
  alphaset manifest view create stage3 --store S --where 'clip_aesthetic >= 6 and min(width, height) >= 1024 and dup_of is null'"""


def _action(
    cmds, name: str, help: str, epilog: str, func, json: bool = True
) -> argparse.ArgumentParser:
    """One `manifest …` action: its parser with --store (and --json), bound to ``func``."""
    p = cmds.add_parser(name, help=help, epilog=epilog, formatter_class=_FMT)
    p.add_argument("--store", required=True, help="store directory or fsspec URL")
    if json:
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=func)
    return p


def _print(args: argparse.Namespace, info, lines) -> None:
    print(manifest.dumps(info) if args.json else "\n".join(lines(info)))


def _show(args: argparse.Namespace) -> int:
    _print(args, manifest.show(Store(args.store)), manifest.show_lines)
    return 0


def _stats(args: argparse.Namespace) -> int:
    _print(args, manifest.stats(Store(args.store)), manifest.stats_lines)
    return 0


def _verify(args: argparse.Namespace) -> int:
    info = manifest.verify(Store(args.store), decode=args.decode)
    _print(args, info, manifest.verify_lines)
    return 0 if info["ok"] else 1


def _repair(args: argparse.Namespace) -> int:
    from pipeline.repair import repair

    info = repair(Store(args.store))
    if args.json:
        print(manifest.dumps(info))
        return 0
    for line in info["actions"]:
        print(f"repair: {line}")
    moved = sum(" to _quarantine/" in a or "quarantine" in a for a in info["actions"])
    print(
        f"repair: done, {len(info['actions']) - 1} fix(es)"
        + (f"; moved files are under {args.store}/{info['quarantine']}" if moved else "")
    )
    return 0


def _plot(args: argparse.Namespace) -> int:
    from curation.plots import plot_store

    info = plot_store(Store(args.store), args.out, captions=args.captions, n=args.n)
    if args.json:
        print(manifest.dumps(info))
        return 0
    for path in info["written"]:
        print(f"wrote {path}")
    for plot, why in info["skipped"].items():
        print(f"skipped {plot}: {why}")
    return 0


def _scores(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def _view_create(args: argparse.Namespace) -> int:
    from pipeline.views import create_view

    info = create_view(
        Store(args.store),
        args.name,
        args.where,
        captions=args.captions,
        scores=_scores(args.scores),
        replace=args.replace,
    )
    if args.json:
        print(manifest.dumps(info))
        return 0
    print("\n".join(_view_lines(info)))
    return 0


def _view_lines(info: dict) -> list[str]:
    tags = [f"scores/{t}" for t in info["scores"]] + (
        [f"captions/{info['captions']}"] if info["captions"] else []
    )
    out = [
        f"view {info['name']}: {info['selected']} of {info['candidates']} ok samples selected "
        f"by {info['where']!r} (tags: {', '.join(tags) or 'meta only'})",
    ]
    for stage, n in info.get("incomplete_stages", {}).items():
        out.append(f"  note: {stage} is missing on {n} shard(s); their rows have null values there")
    return out


def _view_list(args: argparse.Namespace) -> int:
    from pipeline.views import list_views

    views = list_views(Store(args.store))
    if args.json:
        print(manifest.dumps(views))
    elif not views:
        print("no views")
    for v in [] if args.json else views:
        print(f"{v['name']:<16} {v['selected']:>8} / {v['candidates']:<8} {v['where']}")
    return 0


def _view_show(args: argparse.Namespace) -> int:
    from pipeline.views import read_view, view_info

    store = Store(args.store)
    info = view_info(store, args.name)
    if args.json:
        print(manifest.dumps(info))
        return 0
    lines = _view_lines(info)
    lines.append(f"  created {info['created']} with alphaset {info['tool_version']}")
    lines.append(
        "  by shard: " + ", ".join(f"{s} {n}" for s, n in info["selected_by_shard"].items())
    )
    if args.keys:
        keys = read_view(store, args.name)["key"].to_pylist()
        lines.extend(f"  {k}" for k in keys[: args.keys])
    print("\n".join(lines))
    return 0


def _view_drop(args: argparse.Namespace) -> int:
    from pipeline.views import drop_view

    drop_view(Store(args.store), args.name)
    print(f"dropped view {args.name}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "manifest",
        help="inspect, check, repair, plot and slice a store (show, stats, verify, repair, plot, view)",
        description="Inspect, check, plot and slice a store.",
        epilog="Example: alphaset manifest show --store ./store",
        formatter_class=_FMT,
    )
    cmds = p.add_subparsers(dest="manifest_command", metavar="ACTION")
    cmds.required = True

    _action(cmds, "show", "shards, rows and which stages are done where", SHOW_EPILOG, _show)
    _action(
        cmds,
        "stats",
        "counts, size and score percentiles, errors by reason, coverage",
        STATS_EPILOG,
        _stats,
    )
    s = _action(
        cmds,
        "verify",
        "re-read everything; check checksums, counts, key alignment",
        VERIFY_EPILOG,
        _verify,
    )
    s.add_argument("--decode", action="store_true", help="also decode every image (slow)")
    _action(
        cmds,
        "repair",
        "rebuild manifest.json, set aside orphans and damaged shards for a redo",
        REPAIR_EPILOG,
        _repair,
    )
    s = _action(cmds, "plot", "PNG histograms and top/bottom contact sheets", PLOT_EPILOG, _plot)
    s.add_argument("--out", required=True, help="folder (or fsspec URL) for the PNG files")
    s.add_argument(
        "--captions", default=None, help="caption tag to show (default: the only one, if one)"
    )
    s.add_argument("--n", type=int, default=16, help="images per contact sheet (default 16)")

    v = cmds.add_parser(
        "view",
        help="named selections of keys for training stages",
        epilog=VIEW_EPILOG,
        formatter_class=_FMT,
    )
    vcmds = v.add_subparsers(dest="view_command", metavar="ACTION")
    vcmds.required = True
    c = _action(vcmds, "create", "select keys with a SQL filter", VIEW_EPILOG, _view_create)
    c.add_argument("name", help="view name (letters, digits, '_', '-', '.')")
    c.add_argument(
        "--where", required=True, help="SQL filter, e.g. 'clip_aesthetic > 5.5 and width >= 512'"
    )
    c.add_argument(
        "--captions",
        default=None,
        help="caption tag joined as column 'caption' (default: the only one)",
    )
    c.add_argument(
        "--scores",
        default=None,
        help="comma-separated score tags to join (default: all, incl. dedup)",
    )
    c.add_argument("--replace", action="store_true", help="overwrite an existing view of that name")
    _action(vcmds, "list", "every view with its counts and expression", VIEW_EPILOG, _view_list)
    c = _action(vcmds, "show", "a view's expression, tags and counts", VIEW_EPILOG, _view_show)
    c.add_argument("name")
    c.add_argument("--keys", type=int, default=0, help="also print the first N keys")
    c = _action(vcmds, "drop", "delete a view", VIEW_EPILOG, _view_drop, json=False)
    c.add_argument("name")
