"""Reading a store for the Explore tab: pages of rows with thumbnails, a key's every row,
duplicate groups and semantic search. No Gradio here: `ui` calls these and shows the results.

Scale. The unfiltered grid never reads the whole store: the row count of each shard comes from
its ingest status record, so page P is a row range of one or two meta shards, read with only the
grid's columns; captions and scores are read for those shards only (shard N of every stage holds
the keys of image shard N). A ``--where`` filter or a view is evaluated by `pipeline.views` — the
same joined table and SQL as ``manifest view create`` — once, and the (key, shard) list it yields
is paged the same way. Thumbnails are decoded on the fly from the shard's tar, read as a stream
(`pipeline.store.iter_tar_samples`) up to the last key of the page; tars are never extracted.

Search. ``embeddings/<tag>`` is read once per process into a faiss index: exhaustive inner
product (``IndexFlatIP``) up to dedup's ``EXACT_LIMIT["semantic"]`` rows, above it the inverted
file dedup uses (``IndexIVFScalarQuantizer``, fp16, k-means cells from ``curation.dedup._nlist``,
``NPROBE`` probed). Text queries are embedded with the CLIP the tag was made with (its recorded
``--clip``); "more like this" uses the stored embedding of the image.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
from PIL import Image, ImageDraw, ImageOps

from pipeline import fs, views
from pipeline.errors import UserError
from pipeline.images import ImageError, decode
from pipeline.store import Store, StoreError

PAGE_SIZE = 24
THUMB = 192  # thumbnail side, pixels
GROUPS_PER_PAGE = 8
MAX_GROUP_SHOWN = 6  # images of one duplicate group drawn side by side
SEARCH_K = 24
GRID_COLUMNS = ["key", "shard", "status", "error", "width", "height"]
SCORE_PREFIXES = ("clip_", "dup_")  # score columns shown on the grid (all of them in the detail)
BYTES_TYPES = (pl.Binary,)


@dataclass
class Selection:
    """What the grid shows: every meta row (``keys`` None) or the (key, shard) rows of a filter,
    a view or a search, in order."""

    label: str
    total: int
    keys: pl.DataFrame | None = None  # columns key, shard (+ score for a search)
    where: str | None = None


@dataclass
class Item:
    """One grid cell: the row's grid fields, captions by tag, grid scores, and its thumbnail."""

    key: str
    shard: str
    status: str = "ok"
    error: str | None = None
    width: int | None = None
    height: int | None = None
    captions: dict[str, str | None] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    similarity: float | None = None
    thumb: Image.Image | None = None

    def label(self) -> str:
        """The caption under a thumbnail: key, size, scores, error or first caption."""
        parts = [self.key]
        if self.similarity is not None:
            parts.append(f"cos {self.similarity:.3f}")
        if self.width and self.height:
            parts.append(f"{self.width}x{self.height}")
        aes = self.scores.get("clip_aesthetic")
        if aes is not None:
            parts.append(f"aesthetic {aes:.2f}")
        sim = self.scores.get("clip_text_sim")
        if sim is not None:
            parts.append(f"clip {sim:.2f}")
        if self.scores.get("dup_of"):
            parts.append(f"dup of {self.scores['dup_of']}")
        if self.error:
            parts.append(f"error: {self.error}")
        for tag, text in self.captions.items():
            if text:
                parts.append(f"[{tag}] {text[:80]}")
        return " · ".join(parts)


class Explorer:
    """A store opened for browsing. Thread-safe: each cache is built once, under its lock."""

    def __init__(self, root: str):
        if not root or not fs.exists(root):
            raise StoreError(f"--store {root}: no such folder")
        self.store = Store(root)
        self.store.require()
        # pq.read_table imports pyarrow.dataset (and pandas) on its first call, ~0.8 s on a busy
        # 2-vCPU machine: paid here, at start-up, instead of by the first page.
        import pyarrow.dataset  # noqa: F401

        ingest = self.store.completed("ingest")
        self.shards = sorted(ingest)
        if not self.shards:
            raise StoreError(
                f"store {root} is empty: no ingested shards yet; "
                f"add images with 'alphaset ingest folder DIR --store {root}'"
            )
        self.counts = [self._rows(s, ingest[s]) for s in self.shards]
        self.caption_tags = views.stage_tags(self.store, "captions")
        self.score_tags = views.stage_tags(self.store, "scores")
        self.embedding_tags = views.stage_tags(self.store, "embeddings")
        # One lock per cache: building the joined table does not hold up search or duplicates.
        self._locks = {n: threading.Lock() for n in ("joined", "groups", "index", "clip")}
        self._joined: pl.DataFrame | None = None
        self._groups: list[tuple[tuple[str, str], list[dict[str, Any]]]] | None = None
        self._indexes: dict[str, SearchIndex] = {}
        self._clips: dict[str, Any] = {}

    def _rows(self, shard: str, record: dict[str, Any]) -> int:
        rows = record.get("rows")
        if rows is None:  # an old record: the Parquet footer has it
            import pyarrow.parquet as pq

            with fs.open_read(self.store.meta_url(shard)) as f:
                rows = pq.ParquetFile(f).metadata.num_rows
        return int(rows)

    @property
    def total_rows(self) -> int:
        return sum(self.counts)

    def summary(self) -> str:
        parts = [f"{self.total_rows} rows in {len(self.shards)} shards"]
        for name, tags in (
            ("captions", self.caption_tags),
            ("scores", self.score_tags),
            ("embeddings", self.embedding_tags),
        ):
            parts.append(f"{name}: {', '.join(tags) or 'none'}")
        parts.append(f"views: {', '.join(self.view_names()) or 'none'}")
        return "; ".join(parts)

    def view_names(self) -> list[str]:
        return views.view_names(self.store)

    # ---- selections ------------------------------------------------------------------------
    def joined(self) -> pl.DataFrame:
        """The joined table of `pipeline.views` (what a view filters), read once per process."""
        with self._locks["joined"]:
            if self._joined is None:
                self._joined = views.joined_table(self.store)
            return self._joined

    def select(self, where: str | None = None, view: str | None = None) -> Selection:
        """Every row, the rows of view ``view``, or the rows where ``where`` holds (same SQL and
        errors as ``manifest view create``)."""
        where = (where or "").strip() or None
        if where is not None:
            df = views.filter_table(self.joined(), where).select("key", "shard")
            return Selection(f"where {where}", df.height, df, where)
        if view:
            df = pl.from_arrow(views.read_view(self.store, view)).select("key", "shard")
            return Selection(f"view {view}", df.height, df)
        return Selection("every row", self.total_rows)

    # ---- pages -----------------------------------------------------------------------------
    def pages(self, sel: Selection, size: int = PAGE_SIZE) -> int:
        return max(1, -(-sel.total // size))

    def page(self, sel: Selection, number: int, size: int = PAGE_SIZE) -> list[Item]:
        """Items of page ``number`` (1-based, clamped) with captions, scores and thumbnails."""
        number = min(max(1, int(number)), self.pages(sel, size))
        lo, hi = (number - 1) * size, min(number * size, sel.total)
        if sel.keys is None:
            wanted = self._range(lo, hi)
        else:
            part = sel.keys.slice(lo, hi - lo)
            wanted = list(zip(part["key"].to_list(), part["shard"].to_list(), strict=True))
        items = self.items(wanted)
        if sel.keys is not None and "score" in sel.keys.columns:
            for item, s in zip(items, sel.keys.slice(lo, hi - lo)["score"].to_list(), strict=True):
                item.similarity = s
        return items

    def _range(self, lo: int, hi: int) -> list[tuple[str, str]]:
        """(key, shard) of global meta rows [lo, hi): only the shards that hold them are read."""
        out: list[tuple[str, str]] = []
        start = 0
        for shard, n in zip(self.shards, self.counts, strict=True):
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                keys = self.store.read_meta(shard, ["key"])["key"]
                out += [(k, shard) for k in keys.slice(a - start, b - a).to_pylist()]
            start += n
            if start >= hi:
                break
        return out

    def items(self, wanted: list[tuple[str, str]]) -> list[Item]:
        """Grid items for (key, shard) pairs, in the given order."""
        by_shard: dict[str, list[str]] = {}
        for key, shard in wanted:
            by_shard.setdefault(shard, []).append(key)
        found: dict[tuple[str, str], Item] = {}
        for shard, keys in by_shard.items():
            for item in self._shard_items(shard, keys):
                found[(item.key, shard)] = item
        items = [found.get((k, s)) or Item(k, s, "error", "not in meta") for k, s in wanted]
        self._thumbnails(items)
        return items

    def _shard_items(self, shard: str, keys: list[str]) -> list[Item]:
        want = set(keys)
        meta = pl.from_arrow(self.store.read_meta(shard, GRID_COLUMNS))
        meta = meta.filter(pl.col("key").is_in(want))
        items = {
            r["key"]: Item(r["key"], shard, r["status"], r["error"], r["width"], r["height"])
            for r in meta.iter_rows(named=True)
        }
        for tag in self.caption_tags:
            t = self._stage_rows(f"captions/{tag}", shard, want, ["key", "caption"])
            for r in t.iter_rows(named=True) if t is not None else ():
                if r["key"] in items:
                    items[r["key"]].captions[tag] = r["caption"]
        for tag in self.score_tags:
            t = self._stage_rows(f"scores/{tag}", shard, want, None, SCORE_PREFIXES)
            for r in t.iter_rows(named=True) if t is not None else ():
                if r["key"] in items:
                    for k, v in r.items():
                        if k != "key" and v is not None:
                            items[r["key"]].scores.setdefault(k, v)
        return list(items.values())

    def _stage_rows(
        self,
        stage: str,
        shard: str,
        keys: set[str],
        columns: list[str] | None,
        prefixes: tuple[str, ...] = (),
    ) -> pl.DataFrame | None:
        """Rows of ``keys`` in shard ``shard`` of ``stage`` (None when that shard is not done);
        ``prefixes``: read ``key`` and the columns starting with them."""
        rec = self.store.status(stage, shard)
        if rec is None:
            return None
        url = fs.join(self.store.stage_dir(stage), rec.get("output") or f"{shard}.parquet")
        if not url.endswith(".parquet"):
            return None
        if prefixes:
            import pyarrow.parquet as pq

            with fs.open_read(url) as f:
                names = pq.read_schema(f).names
            columns = ["key", *[c for c in names if c.startswith(prefixes)]]
        t = pl.from_arrow(fs.read_parquet(url, columns))
        return t.filter(pl.col("key").is_in(keys))

    def _thumbnails(self, items: list[Item]) -> None:
        """Decode each ok item's image from its shard's tar (streamed, stopping at the last one
        needed) into a thumbnail; error rows and missing images get a placeholder."""
        by_shard: dict[str, dict[str, list[Item]]] = {}
        for item in items:
            if item.status == "ok":
                by_shard.setdefault(item.shard, {}).setdefault(item.key, []).append(item)
        missing = set()
        for shard, pending in by_shard.items():
            if not fs.exists(self.store.image_url(shard)):
                missing.add(shard)
                continue
            for key, data in self._images(shard, set(pending)):
                for item in pending[key]:
                    item.thumb = thumbnail(data)
        for item in items:
            if item.thumb is None:
                reason = item.error or (
                    f"images/{item.shard}.tar is missing"
                    if item.shard in missing
                    else "not in the shard's tar"
                )
                item.thumb = placeholder(reason)

    def _images(self, shard: str, keys: set[str]):
        """(key, image bytes) of ``keys`` from the shard's tar, stopping once all are found.

        A local tar is read by its member headers, seeking over the data of other images, so a
        key deep in a shard of large photos costs a header read per earlier member; a remote tar
        is streamed (`Store.iter_images`), as a seek there is a new request."""
        left = set(keys)
        url = self.store.image_url(shard)
        if fs.is_local(url):
            images = _local_members(fs.local_path(url), left)
        else:
            images = ((k, data) for k, _ext, data in self.store.iter_images(shard))
        for key, data in images:
            if key in left:
                left.discard(key)
                yield key, data
                if not left:
                    return

    # ---- one key ---------------------------------------------------------------------------
    def find(self, key: str) -> str:
        """The shard that holds ``key`` (reads only the meta ``key`` column, shard by shard)."""
        for shard in self.shards:
            if key in set(self.store.read_meta(shard, ["key"])["key"].to_pylist()):
                return shard
        raise StoreError(f"no key {key!r} in {self.store.root}")

    def detail(self, key: str, shard: str) -> tuple[Image.Image | None, dict[str, Any]]:
        """The image and every row the store holds for ``key``: meta, each caption and score
        tag (dedup included), the embedding's size, the edge map's presence."""
        meta = pl.from_arrow(self.store.read_meta(shard)).filter(pl.col("key") == key)
        if meta.height == 0:
            raise StoreError(f"no key {key!r} in meta shard {shard}")
        rows: dict[str, Any] = {"meta": _plain(meta.row(0, named=True))}
        for stage in self.store.stages():
            t = self._stage_rows(stage, shard, {key}, None)
            if t is None or t.height == 0:
                continue
            row = t.row(0, named=True)
            if stage.startswith("embeddings/"):
                vec = row.get("embedding")
                row["embedding"] = None if vec is None else f"{len(vec)}-d vector"
            for c, dtype in t.schema.items():
                if dtype in BYTES_TYPES and row.get(c) is not None:
                    row[c] = f"{len(row[c])} bytes"
            rows[stage] = _plain(row)
        image = None
        if rows["meta"].get("status") == "ok":
            for _, data in self._images(shard, {key}):
                image = decode(data)[0]
        return image, rows

    # ---- duplicates ------------------------------------------------------------------------
    def dup_groups(self) -> list[tuple[tuple[str, str], list[dict[str, Any]]]]:
        """Dedup groups: ((kept key, its shard), [members with dup_kind, dup_score, shard]),
        largest groups first. Empty when the store has no ``scores/dedup``."""
        with self._locks["groups"]:
            if self._groups is None:
                self._groups = self._read_groups()
            return self._groups

    def _read_groups(self) -> list[tuple[tuple[str, str], list[dict[str, Any]]]]:
        stage = f"scores/{views.DEDUP_TAG}"
        frames = []
        for shard, rec in sorted(self.store.completed(stage).items()):
            url = fs.join(self.store.stage_dir(stage), rec.get("output") or f"{shard}.parquet")
            cols = ["key", "dup_of", "dup_kind", "dup_score"]
            frames.append(
                pl.from_arrow(fs.read_parquet(url, cols)).with_columns(shard=pl.lit(shard))
            )
        if not frames:
            return []
        df = pl.concat(frames)
        where = dict(zip(df["key"].to_list(), df["shard"].to_list(), strict=True))
        dups = df.filter(pl.col("dup_of").is_not_null())
        groups: dict[str, list[dict[str, Any]]] = {}
        for r in dups.iter_rows(named=True):
            groups.setdefault(r["dup_of"], []).append(r)
        out = [((kept, where.get(kept, "")), members) for kept, members in groups.items()]
        out.sort(key=lambda g: (-len(g[1]), g[0][0]))
        return out

    def dup_page(self, number: int) -> tuple[list[tuple[Image.Image, str]], int, int]:
        """(strip image, label) per group of page ``number``, the page count, the group count."""
        groups = self.dup_groups()
        n_pages = max(1, -(-len(groups) // GROUPS_PER_PAGE))
        number = min(max(1, int(number)), n_pages)
        page = groups[(number - 1) * GROUPS_PER_PAGE : number * GROUPS_PER_PAGE]
        wanted = []
        for (kept, kshard), members in page:
            wanted.append((kept, kshard))
            wanted += [(m["key"], m["shard"]) for m in members[: MAX_GROUP_SHOWN - 1]]
        thumbs = {(i.key, i.shard): i.thumb for i in self.items(wanted)}
        out = []
        for (kept, kshard), members in page:
            cells = [(thumbs[(kept, kshard)], f"KEPT {kept}", (40, 160, 60))]
            for m in members[: MAX_GROUP_SHOWN - 1]:
                cells.append(
                    (
                        thumbs[(m["key"], m["shard"])],
                        f"{m['key']} {m['dup_kind']} {m['dup_score'] or 0:.2f}",
                        (200, 60, 50),
                    )
                )
            more = (
                f" (+{len(members) - MAX_GROUP_SHOWN + 1} more)"
                if len(members) >= MAX_GROUP_SHOWN
                else ""
            )
            label = (
                f"kept {kept} · {len(members)} duplicate(s): "
                + ", ".join(f"{m['key']} ({m['dup_kind']})" for m in members[: MAX_GROUP_SHOWN - 1])
                + more
            )
            out.append((strip(cells), label))
        return out, n_pages, len(groups)

    # ---- search ----------------------------------------------------------------------------
    def search_index(self, tag: str | None) -> SearchIndex:
        if not self.embedding_tags:
            raise StoreError(
                "semantic search needs embeddings: this store has no embeddings/<tag>; "
                f"run 'alphaset score --store {self.store.root}'"
            )
        tag = tag or self.embedding_tags[0]
        if tag not in self.embedding_tags:
            raise StoreError(f"no embeddings/{tag} (tags: {', '.join(self.embedding_tags)})")
        with self._locks["index"]:
            if tag not in self._indexes:
                self._indexes[tag] = SearchIndex.build(self.store, tag)
            return self._indexes[tag]

    def clip_for(self, tag: str) -> Any:
        """The CLIP that made ``embeddings/<tag>`` (its recorded ``--clip``), loaded once."""
        from curation.models import load_clip

        cfg = self.store.stage_config(f"embeddings/{tag}") or {}
        value = (cfg.get("settings") or {}).get("clip")
        if not value:
            raise StoreError(f"embeddings/{tag} records no CLIP model; cannot embed a text query")
        with self._locks["clip"]:
            if tag not in self._clips:
                self._clips[tag] = load_clip(value, "auto")
            return self._clips[tag]

    def search_text(self, text: str, tag: str | None = None, k: int = SEARCH_K) -> Selection:
        """The ``k`` images nearest (cosine) to the text, embedded by the tag's CLIP."""
        import torch

        if not text or not text.strip():
            raise UserError("type a text to search for")
        index = self.search_index(tag)
        clip = self.clip_for(index.tag)
        with torch.inference_mode():
            tokens = clip.tokenizer([text.strip()]).to(clip.device)
            q = clip.model.encode_text(tokens, normalize=True).float().cpu().numpy()  # (1, D)
        if q.shape[1] != index.dim:
            raise StoreError(
                f"the CLIP of embeddings/{index.tag} makes {q.shape[1]}-d text vectors but the "
                f"stored ones are {index.dim}-d"
            )
        return index.search(q[0], k, f"search {text.strip()!r}")

    def search_like(self, key: str, tag: str | None = None, k: int = SEARCH_K) -> Selection:
        """The ``k`` images nearest to the stored embedding of ``key`` ("more like this")."""
        index = self.search_index(tag)
        return index.search(index.vector(key), k, f"more like {key}")

    # ---- views -----------------------------------------------------------------------------
    def save_view(self, name: str, where: str | None, replace: bool = False) -> dict[str, Any]:
        """``STORE/views/NAME.parquet`` of the filter: `pipeline.views.create_view`, exactly what
        ``manifest view create NAME --where WHERE`` writes."""
        if not (where or "").strip():
            raise UserError("type a --where expression to save it as a view")
        if not (name or "").strip():
            raise UserError("type a name for the view")
        return views.create_view(self.store, name.strip(), where.strip(), replace=replace)


@dataclass
class SearchIndex:
    """A faiss index over one ``embeddings/<tag>``: rows are the store's valid embeddings."""

    tag: str
    keys: list[str]
    shards: list[str]
    vectors: np.ndarray  # (N, D) float32, L2-normalised
    index: Any
    method: str

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @classmethod
    def build(cls, store: Store, tag: str) -> SearchIndex:
        import faiss

        from curation.dedup import EXACT_LIMIT, NPROBE, TRAIN_PER_CELL, _nlist, semantic_ivf

        stage = f"embeddings/{tag}"
        keys: list[str] = []
        shards: list[str] = []
        blocks = []
        for shard, rec in sorted(store.completed(stage).items()):
            url = fs.join(store.stage_dir(stage), rec.get("output") or f"{shard}.parquet")
            t = fs.read_parquet(url, ["key", "embedding"])
            t = t.filter(t["embedding"].is_valid())
            if t.num_rows == 0:
                continue
            col = t["embedding"].combine_chunks()
            blocks.append(col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1))
            keys += t["key"].to_pylist()
            shards += [shard] * t.num_rows
        if not blocks:
            raise StoreError(f"{stage} has no embeddings yet (no completed shard with a valid row)")
        vectors = np.concatenate(blocks).astype(np.float32)  # (N, D)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        n, dim = vectors.shape
        if n <= EXACT_LIMIT["semantic"]:
            index = faiss.IndexFlatIP(dim)
            method = "exhaustive"
        else:  # dedup's inverted file, for k nearest instead of a range
            nlist = _nlist(n, None)
            index = semantic_ivf(dim, nlist)
            stride = max(1, n // (TRAIN_PER_CELL * nlist))
            index.train(np.ascontiguousarray(vectors[::stride]))
            index.nprobe = min(NPROBE, nlist)
            method = f"faiss IVF ({nlist} cells, {index.nprobe} probed)"
        index.add(vectors)
        return cls(tag, keys, shards, vectors, index, method)

    def vector(self, key: str) -> np.ndarray:
        try:
            return self.vectors[self.keys.index(key)]
        except ValueError:
            raise StoreError(f"{key} has no embedding in embeddings/{self.tag}") from None

    def search(self, q: np.ndarray, k: int, label: str) -> Selection:
        q = np.asarray(q, np.float32)[None]  # (1, D)
        q /= max(float(np.linalg.norm(q)), 1e-12)
        sims, idx = self.index.search(q, min(k, len(self.keys)))
        hits = [(int(i), float(s)) for i, s in zip(idx[0], sims[0], strict=True) if i >= 0]
        df = pl.DataFrame(
            {
                "key": [self.keys[i] for i, _ in hits],
                "shard": [self.shards[i] for i, _ in hits],
                "score": [s for _, s in hits],
            },
            schema={"key": pl.String, "shard": pl.String, "score": pl.Float64},
        )
        return Selection(f"{label} ({self.method}, embeddings/{self.tag})", df.height, df)


# ---- images ---------------------------------------------------------------------------------
IMAGE_EXTS = ("jpg", "png", "webp")  # what `Store.iter_images` yields


def _local_members(path: str, keys: set[str]):
    """(key, image bytes) of ``keys`` from a local WebDataset tar, in member order, reading every
    member's header but only the data of ``keys``: the others are seeked over (``tarfile``'s
    random-access mode). Keys as in `pipeline.store.iter_tar_stream`; unsafe member names are
    skipped, never extracted."""
    import tarfile

    from pipeline.store import check_member_name

    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for member in tar:
            try:
                check_member_name(member.name)
            except ValueError:
                continue
            base = member.name.rsplit("/", 1)[-1]
            stem, _, ext = base.partition(".")
            key = member.name[: len(member.name) - len(base)] + stem
            if member.isfile() and ext.lower() in IMAGE_EXTS and key in keys:
                f.seek(member.offset_data)
                yield key, f.read(member.size)


def thumbnail(data: bytes, side: int = THUMB) -> Image.Image:
    """A thumbnail of stored image bytes (JPEG decoded at a reduced DCT scale), or a placeholder."""
    try:
        img, _ = decode(data, max_side=side)
    except ImageError as e:
        return placeholder(f"undecodable: {e}", side)
    img.thumbnail((side, side))
    return img


def placeholder(text: str, side: int = THUMB) -> Image.Image:
    img = Image.new("RGB", (side, side), (60, 60, 60))
    draw = ImageDraw.Draw(img)
    words, lines, line = text.split(), [], ""
    for w in words:
        if len(line) + len(w) > 24:
            lines.append(line)
            line = ""
        line = f"{line} {w}".strip()
    lines.append(line)
    draw.multiline_text((8, 8), "\n".join(lines[:8]), fill=(230, 230, 230))
    return img


def strip(cells: list[tuple[Image.Image, str, tuple[int, int, int]]]) -> Image.Image:
    """Images side by side, each framed in its colour with its label underneath."""
    pad, text_h = 6, 14
    framed = []
    for img, text, colour in cells:
        box = ImageOps.pad(img, (THUMB, THUMB), color=(30, 30, 30))
        box = ImageOps.expand(box, border=pad, fill=colour)
        cell = Image.new("RGB", (box.width, box.height + text_h), (255, 255, 255))
        cell.paste(box, (0, 0))
        ImageDraw.Draw(cell).text((2, box.height + 1), text[:34], fill=(0, 0, 0))
        framed.append(cell)
    out = Image.new("RGB", (sum(c.width for c in framed), framed[0].height), (255, 255, 255))
    x = 0
    for c in framed:
        out.paste(c, (x, 0))
        x += c.width
    return out


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-friendly values: floats rounded, lists shortened."""
    out = {}
    for k, v in row.items():
        if isinstance(v, float):
            v = round(v, 4)
        elif isinstance(v, list) and len(v) > 8:
            v = f"{len(v)} values"
        out[k] = v
    return out
