"""Named views: the keys a training stage sees, chosen by a filter over the joined store tables.

``joined_table`` joins, on ``key``, the ok rows of ``meta`` with every ``scores/<tag>`` table
(``scores/dedup`` included) and one ``captions/<tag>`` table (its ``caption`` column). Only shards
with a status record are read, so a half-written stage never leaks in; shards a stage has not
done yet give nulls, and a null never passes a filter.

Column collisions: the earlier table wins, in the order meta, scores (tags sorted), captions —
so ``width``/``height`` always come from meta and every stage's ``error`` column is dropped
(rows with a stage error have null scores). The exception is two score tags that both provide
the same score column (e.g. two CLIP models each writing ``clip_aesthetic``): which one a filter
means is ambiguous, so that is an error asking for ``scores=[...]`` (``--scores TAG,...``).

A view is ``STORE/views/<name>.parquet`` with columns ``key`` and ``shard`` (shard order, then
ingest order within a shard) and, in the Parquet schema metadata under ``alphaset.view``, a JSON
record of the expression, the tags used and the counts — readable by pyarrow or polars alone::

    json.loads(pq.read_schema("STORE/views/stage3.parquet").metadata[b"alphaset.view"])

The ``where`` expression is SQL (polars ``sql_expr``): ``clip_aesthetic >= 6 and
min(width, height) >= 1024 and dup_of is null``. Two-argument ``min``/``max`` are rewritten to
SQL's ``least``/``greatest``; a column name that is not a plain identifier needs double quotes
(``"my-score" > 0.3``).
"""

from __future__ import annotations

import json
import re
from typing import Any

import polars as pl
import pyarrow as pa

from pipeline import __version__, fs
from pipeline.errors import UserError
from pipeline.store import Store, StoreError, now_iso

VIEWS_DIR = "views"
META_KEY = b"alphaset.view"
DEDUP_TAG = "dedup"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MINMAX = re.compile(r"\b(min|max)\s*\(", re.IGNORECASE)
# Where a missing column would come from, for the unknown-column message.
_PRODUCERS = {
    "dup_of": "alphaset dedup",
    "dup_kind": "alphaset dedup",
    "dup_score": "alphaset dedup",
    "caption": "alphaset caption (or --captions TAG when there are several tags)",
    "clip_": "alphaset score",
    "aspect": "alphaset score",
    "megapixels": "alphaset score",
    "sharpness": "alphaset score",
    "phash": "alphaset score",
}


# ---- reading the store's tables ---------------------------------------------------------------
def stage_tags(store: Store, kind: str) -> list[str]:
    """Tags of ``kind`` (e.g. ``scores``) present in the store, sorted."""
    return [s.split("/", 1)[1] for s in store.stages() if s.split("/", 1)[0] == kind]


def read_stage(store: Store, stage: str) -> pl.DataFrame | None:
    """Every completed Parquet shard of ``stage`` as one frame (None when none is done)."""
    frames = []
    for shard, rec in sorted(store.completed(stage).items()):
        url = fs.join(store.stage_dir(stage), rec.get("output") or f"{shard}.parquet")
        if not url.endswith(".parquet"):
            continue
        frames.append(pl.from_arrow(fs.read_parquet(url)))
    if not frames:
        return None
    return pl.concat(frames, how="diagonal_relaxed")


def read_meta_ok(store: Store) -> pl.DataFrame:
    """The ok rows of every ingested meta shard, in shard order then ingest order."""
    store.require()
    frames = [pl.from_arrow(store.read_meta(s)) for s in store.shards()]
    if not frames:
        raise StoreError(f"store {store.root} has no ingested shards yet")
    meta = pl.concat(frames, how="diagonal_relaxed")
    return meta.filter(pl.col("status") == "ok")


def caption_tag(store: Store, captions: str | None) -> str | None:
    """The caption tag a view or plot uses: ``captions`` (checked), else the store's only one."""
    tags = stage_tags(store, "captions")
    if captions is None:
        return tags[0] if len(tags) == 1 else None
    if captions not in tags:
        have = ", ".join(tags) or "none"
        raise StoreError(f"no captions/{captions} in {store.root} (caption tags: {have})")
    return captions


def _choose_scores(store: Store, scores: list[str] | None) -> list[str]:
    tags = stage_tags(store, "scores")
    if scores is None:
        return tags
    unknown = [t for t in scores if t not in tags]
    if unknown:
        have = ", ".join(tags) or "none"
        raise StoreError(f"no scores/{unknown[0]} in {store.root} (score tags: {have})")
    return list(scores)


def joined_table(
    store: Store, captions: str | None = None, scores: list[str] | None = None
) -> pl.DataFrame:
    """meta ok rows ⋈ scores/<tag> (all tags, or ``scores``) ⋈ captions/<captions>, on ``key``.

    ``captions=None`` uses the store's only caption tag when there is exactly one, else none.
    Rows keep meta order (shard, then ingest order).
    """
    df = read_meta_ok(store).with_row_index("_row")
    owner = {c: "meta" for c in df.columns}
    for tag in _choose_scores(store, scores):
        table = read_stage(store, f"scores/{tag}")
        if table is None:
            continue
        add = []
        for col in table.columns:
            if col in ("key", "error"):
                continue
            if col in owner:
                if owner[col] != "meta" and owner[col].startswith("scores/"):
                    raise StoreError(
                        f"score column {col!r} is in both {owner[col]} and scores/{tag}; "
                        f"choose the score tags to use with --scores (e.g. --scores {tag}"
                        + ("" if tag == DEDUP_TAG else f",{DEDUP_TAG}")
                        + ")"
                    )
                continue
            owner[col] = f"scores/{tag}"
            add.append(col)
        df = df.join(table.select(["key", *add]).unique("key", keep="first"), on="key", how="left")
    cap_tag = caption_tag(store, captions)
    if cap_tag is not None:
        table = read_stage(store, f"captions/{cap_tag}")
        if table is not None:
            add = [c for c in table.columns if c not in ("key", "error") and c not in owner]
            for c in add:
                owner[c] = f"captions/{cap_tag}"
            df = df.join(
                table.select(["key", *add]).unique("key", keep="first"), on="key", how="left"
            )
    return df.sort("_row").drop("_row")


# ---- the filter -------------------------------------------------------------------------------
def _rewrite_minmax(expr: str) -> str:
    """``min(a, b)`` → ``least(a, b)``, ``max(a, b)`` → ``greatest(a, b)``; one-argument
    ``min(x)`` (an aggregate) and text inside quotes are left alone."""
    out = []
    i = 0
    while i < len(expr):
        ch = expr[i]
        if ch in "'\"":  # copy a quoted literal or identifier verbatim
            j = expr.find(ch, i + 1)
            j = len(expr) - 1 if j < 0 else j
            out.append(expr[i : j + 1])
            i = j + 1
            continue
        m = _MINMAX.match(expr, i)
        if m and (i == 0 or not (expr[i - 1].isalnum() or expr[i - 1] == "_")):
            depth, commas, j = 0, 0, m.end() - 1
            while j < len(expr):
                c = expr[j]
                if c in "'\"":
                    k = expr.find(c, j + 1)
                    j = len(expr) if k < 0 else k
                elif c == "(":
                    depth += 1
                elif c == ")":
                    depth -= 1
                    if depth == 0:
                        break
                elif c == "," and depth == 1:
                    commas += 1
                j += 1
            name = m.group(1).lower()
            if commas:
                name = "least" if name == "min" else "greatest"
            out.append(name + "(")
            i = m.end()
            continue
        out.append(ch)
        i += 1
    return "".join(out)


MAX_WHERE = 10_000  # characters; a filter longer than this is a mistake (a pasted file?)
# SQL aggregates: in a row filter they would compare each row with a whole-column value.
_AGGREGATE = re.compile(
    r"\b(sum|avg|mean|count|min|max|median|stddev|stddev_samp|variance|var_samp|first|last|"
    r"array_agg|string_agg|quantile_cont|quantile_disc|bit_and|bit_or|bool_and|bool_or)\s*\(",
    re.IGNORECASE,
)


def _unquoted(expr: str) -> str:
    """``expr`` with every quoted literal or identifier blanked out (for keyword checks)."""
    return re.sub(r"'[^']*'|\"[^\"]*\"", lambda m: " " * len(m.group(0)), expr)


def filter_table(df: pl.DataFrame, where: str) -> pl.DataFrame:
    """Rows of ``df`` where the SQL expression ``where`` is true (null counts as false)."""
    columns = ", ".join(df.columns)
    if not where or not where.strip():
        raise UserError(f"empty --where expression; columns: {columns}")
    if len(where) > MAX_WHERE:
        raise UserError(
            f"--where is {len(where)} characters long (at most {MAX_WHERE}); "
            "select with a shorter expression"
        )
    rewritten = _rewrite_minmax(where)
    agg = _AGGREGATE.search(_unquoted(rewritten))
    if agg:
        raise UserError(
            f"--where {where[:80]!r}: {agg.group(1)}(...) aggregates a whole column; a view "
            "filters rows one by one (two-argument min(a, b) / max(a, b) compare within a row)"
        )
    try:
        expr = pl.sql_expr(rewritten)
        return df.filter(expr)
    except pl.exceptions.ColumnNotFoundError as e:
        m = re.search(r'column "?([^"\s;]+)"?', str(e))
        name = m.group(1) if m else ""
        hint = next((f" (made by '{v}')" for k, v in _PRODUCERS.items() if name.startswith(k)), "")
        raise UserError(
            f"unknown column {name!r}{hint} in --where {where!r}; columns: {columns}"
        ) from None
    except (pl.exceptions.PolarsError, TypeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(
            f"bad --where expression {where!r} ({reason}); columns: {columns}"
        ) from None


# ---- views ------------------------------------------------------------------------------------
def view_url(store: Store, name: str) -> str:
    return store.url(VIEWS_DIR, f"{name}.parquet")


def _check_name(name: str) -> None:
    if not _NAME.match(name) or name.endswith(".parquet"):
        raise UserError(
            f"bad view name {name!r}: use letters, digits, '_', '-', '.', not starting with '_' or '.'"
        )


def create_view(
    store: Store,
    name: str,
    where: str,
    captions: str | None = None,
    scores: list[str] | None = None,
    replace: bool = False,
) -> dict[str, Any]:
    """Select the keys where ``where`` holds and write ``views/<name>.parquet``; return its info."""
    _check_name(name)
    store.require()
    if fs.exists(view_url(store, name)) and not replace:
        raise StoreError(f"view {name!r} already exists; drop it first or pass --replace")
    df = joined_table(store, captions=captions, scores=scores)
    selected = filter_table(df, where)
    shards = store.shards()
    score_tags = _choose_scores(store, scores)
    cap_tag = caption_tag(store, captions)
    used = [f"scores/{t}" for t in score_tags] + ([f"captions/{cap_tag}"] if cap_tag else [])
    coverage = {s: len(store.completed(s)) for s in used}
    info = {
        "name": name,
        "where": where,
        "captions": cap_tag,
        "scores": score_tags,
        "candidates": df.height,
        "selected": selected.height,
        "shards": len(shards),
        "selected_by_shard": {
            s: n for s, n in selected.group_by("shard").len().sort("shard").iter_rows()
        },
        "incomplete_stages": {s: len(shards) - n for s, n in coverage.items() if n < len(shards)},
        "created": now_iso(),
        "tool_version": __version__,
    }
    table = (
        selected.select(["key", "shard"])
        .to_arrow()
        .cast(pa.schema([("key", pa.string()), ("shard", pa.string())]))
    )
    table = table.replace_schema_metadata({META_KEY: json.dumps(info, sort_keys=True).encode()})
    fs.write_parquet(view_url(store, name), table)
    return info


def _read_view_file(store: Store, name: str) -> pa.Table:
    _check_name(name)
    url = view_url(store, name)
    if not fs.exists(url):
        have = ", ".join(view_names(store)) or "none"
        raise StoreError(f"no view {name!r} in {store.root} (views: {have})")
    return fs.read_parquet(url)


def read_view(store: Store, name: str) -> pa.Table:
    """The view's rows (``key``, ``shard``), in shard order."""
    return _read_view_file(store, name)


def view_info(store: Store, name: str) -> dict[str, Any]:
    """The record stored with the view: expression, tags, counts, time."""
    meta = _read_view_file(store, name).schema.metadata or {}
    if META_KEY not in meta:
        raise StoreError(f"{view_url(store, name)} has no {META_KEY.decode()} metadata")
    return json.loads(meta[META_KEY])


def view_keys(store: Store, name: str) -> dict[str, list[str]]:
    """shard → selected keys of that shard, shards in order, keys in ingest order."""
    t = read_view(store, name)
    out: dict[str, list[str]] = {}
    for key, shard in zip(t["key"].to_pylist(), t["shard"].to_pylist(), strict=True):
        out.setdefault(shard, []).append(key)
    return dict(sorted(out.items()))


def view_names(store: Store) -> list[str]:
    return [
        n[: -len(".parquet")]
        for n in fs.ls(store.url(VIEWS_DIR), ".parquet")
        if not n.startswith(("_", "."))
    ]


def list_views(store: Store) -> list[dict[str, Any]]:
    """The info record of every view, by name."""
    store.require()
    return [view_info(store, n) for n in view_names(store)]


def drop_view(store: Store, name: str) -> None:
    """Delete ``views/<name>.parquet`` (StoreError if there is no such view)."""
    _read_view_file(store, name)
    fs.remove(view_url(store, name))
