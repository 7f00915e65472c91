"""`alphaset dedup`: exact, near (perceptual hash) and semantic (CLIP cosine) duplicates across the
whole store → ``scores/dedup/<shard>.parquet`` (key, dup_of, dup_kind, dup_score, error).

Pairs come from three detectors: the same meta ``sha256`` (exact), a phash Hamming distance
``<= phash_threshold`` (near) and an embedding cosine ``>= semantic_threshold`` (semantic). Groups
form around kept images, not as connected components (which chain A~B~C into one group however
far A is from C): images are visited in keep-priority order — highest ``clip_aesthetic``, then
most pixels, then smallest key — and each one not yet assigned is kept and takes as duplicates
the unassigned images linked *to it* (`group_duplicates`). So every duplicate is within the
threshold of its ``dup_of``; ``dup_kind`` is that link's kind (exact > phash > semantic) and
``dup_score`` its similarity (1.0 exact, 1 − hamming/64 for phash, the cosine for semantic). The
status records count how many rows each (stricter) threshold would remove, for `manifest stats`.

Neighbour search is a range search — the neighbours within the threshold, the ``MAX_LINKS``
strongest per image, identical hashes and byte copies searched once, so a group of m copies costs
O(m) links, not m²/2 — exhaustive up to ``EXACT_LIMIT`` rows (measured by bench/dedup.py) and through a faiss
inverted file (k-means cells, ``nprobe`` probed per query) above, fed shard by shard so memory is
the index, not a copy of every embedding. Dedup is global: when any input changed (checksums of the ingest,
score and embedding shards, recorded in the stage settings) it reruns completely; when nothing
changed it does nothing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline import fs
from pipeline.errors import UserError
from pipeline.store import Store, StoreError

log = logging.getLogger(__name__)

STAGE = "scores/dedup"
KINDS = ("exact", "phash", "semantic")  # strongest first
_PRIORITY = {"exact": 3, "phash": 2, "semantic": 1}
# Exhaustive search up to this many rows, a faiss inverted file (IVF) above. bench/dedup.py
# (2 vCPUs, random data): semantic, 768-d — exhaustive blockwise 7.4 / 40 / 153 CPU-s at 21k /
# 51k / 101k vectors against 5.3 / 23 / 63 for the IVF (recall 1.000 each); phash — faiss's
# exhaustive popcount search 707 CPU-s at 1M hashes (7 at 100k: quadratic) against 251 for the
# IVF (recall 1.000).
EXACT_LIMIT = {"phash": 200_000, "semantic": 20_000}
BLOCK = 2048  # rows per tile of the exact search
# Inverted-file search: cells probed per query, k-means iterations, training points per cell.
# bench/dedup.py, recall of planted near copies in random data (the worst case: no clusters):
# 100k 768-d vectors at cosine ~0.97 — 0.94 with 1 probe, 0.998 with 4, 1.000 with 16; 1M
# 64-bit hashes 6 bits apart — 0.92 with 64 probes, 1.000 with 256.
NPROBE = 16
NPROBE_PHASH = 256
KMEANS_ITERS = 10
TRAIN_PER_CELL = 64
# Links kept per image, its strongest: a group of m near-copies (placeholder images, memes) would
# otherwise give m²/2 pairs; 64 links per member still join the group.
MAX_LINKS = 64
# Semantic thresholds (stricter than the configured one) whose removal counts dedup records, so
# `manifest stats` shows what tightening the threshold would keep.
SEMANTIC_SWEEP = (0.9, 0.95, 0.97, 0.98, 0.99)


@dataclass
class DedupConfig:
    """Settings of `alphaset dedup`."""

    embeddings: str | None = None  # score tag whose phash/aesthetic/embeddings are used
    phash_threshold: int = 8  # max Hamming distance of the 64-bit phash
    semantic_threshold: float = 0.95  # min cosine of L2-normalised CLIP embeddings
    semantic: bool = True
    nprobe: int = NPROBE  # IVF cells probed per query, semantic search
    phash_nprobe: int = NPROBE_PHASH  # IVF cells probed per query, phash search
    exact_limit: int | None = None  # override EXACT_LIMIT for both kinds (tests, benchmarks)
    threads: int = 0  # faiss threads; 0 = all cores

    def __post_init__(self) -> None:
        if not 0 <= self.phash_threshold <= 32:
            raise UserError(
                f"--phash-threshold must be in 0..32 bits (of 64), got {self.phash_threshold}"
            )
        if not 0.0 < self.semantic_threshold <= 1.0:
            raise UserError(
                f"--semantic-threshold must be a cosine in (0, 1], got {self.semantic_threshold}"
            )
        if self.nprobe < 1 or self.phash_nprobe < 1:
            raise UserError(
                f"--nprobe and --phash-nprobe must be >= 1, got {self.nprobe}, {self.phash_nprobe}"
            )


# ---- neighbour search -----------------------------------------------------------------------
@dataclass
class Pairs:
    """Edges ``i < j`` with a similarity in [0, 1]."""

    i: np.ndarray
    j: np.ndarray
    score: np.ndarray
    method: str = "exact"

    @classmethod
    def empty(cls, method: str = "exact") -> Pairs:
        z = np.zeros(0, dtype=np.int64)
        return cls(z, z.copy(), np.zeros(0, dtype=np.float32), method)

    @classmethod
    def concat(cls, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]], method: str) -> Pairs:
        if not parts:
            return cls.empty(method)
        i, j, s = (np.concatenate(x) for x in zip(*parts, strict=True))
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        keep = lo != hi
        lo, hi, s = lo[keep], hi[keep], s[keep]
        # the same pair may come from both ends of an approximate search: keep one
        order = np.lexsort((hi, lo))
        lo, hi, s = lo[order], hi[order], s[order]
        first = np.ones(len(lo), dtype=bool)
        first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
        return cls(lo[first], hi[first], s[first].astype(np.float32), method)

    def __len__(self) -> int:
        return len(self.i)


def hamming_pairs(
    hashes: np.ndarray,
    threshold: int,
    exact_limit: int | None = None,
    nprobe: int = NPROBE_PHASH,
    nlist: int | None = None,
    threads: int = 0,
    stats: dict[str, float] | None = None,
) -> Pairs:
    """Pairs of 64-bit hashes (uint64) within ``threshold`` bits; score = 1 − distance/64.

    Identical hashes are searched once: the first row of each links the others (score 1), and
    the search links those first rows. The search is a faiss range search (each hash's
    neighbours within the threshold, the MAX_LINKS closest kept): exhaustive
    (``IndexBinaryFlat``) up to ``exact_limit`` distinct hashes, above it an inverted file of
    binary k-means cells (``IndexBinaryIVF``, ``nlist`` default 4·√n) probing ``nprobe`` cells
    per query. ``stats`` as in `cosine_pairs`.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    uniq, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    with _faiss_threads(threads):
        p = _hamming_search(uniq, threshold, exact_limit, nprobe, nlist, stats)
    rows, head = (
        np.arange(len(hashes), dtype=np.int64),
        first[inverse],
    )  # head: first row, same hash
    copy = rows != head
    star = (head[copy], rows[copy], np.ones(int(copy.sum()), np.float32))
    return Pairs.concat([(first[p.i], first[p.j], p.score), star], p.method)


def _hamming_search(
    hashes: np.ndarray,
    threshold: int,
    exact_limit: int | None,
    nprobe: int,
    nlist: int | None,
    stats: dict[str, float] | None,
) -> Pairs:
    import faiss

    n = len(hashes)
    limit = EXACT_LIMIT["phash"] if exact_limit is None else exact_limit
    packed = np.ascontiguousarray(hashes.astype(np.uint64)).view(np.uint8).reshape(n, 8)
    t0 = time.perf_counter()
    if n <= limit:
        index, method = faiss.IndexBinaryFlat(64), "exact"
    else:
        nlist = _nlist(n, nlist)
        index, method = faiss.IndexBinaryIVF(faiss.IndexBinaryFlat(64), 64, nlist), "faiss-ivf"
        index.cp.niter = KMEANS_ITERS
        index.train(packed[:: max(1, n // (TRAIN_PER_CELL * nlist))])
        index.nprobe = min(nprobe, nlist)
    t1 = time.perf_counter()
    index.add(packed)
    t2 = time.perf_counter()
    parts = []
    for a in range(0, n, 1 << 16):
        lims, dist, keys = index.range_search(packed[a : a + (1 << 16)], threshold + 1)  # d < r
        rows = (
            np.repeat(np.arange(len(lims) - 1, dtype=np.int64), np.diff(lims).astype(np.int64)) + a
        )
        parts.append(strongest(rows, keys.astype(np.int64), 1.0 - dist / 64.0))
    if stats is not None:
        stats.update(train_s=t1 - t0, add_s=t2 - t1, search_s=time.perf_counter() - t2)
        stats.update(index_bytes=float(n * (8 + (8 if method != "exact" else 0))))
    return Pairs.concat(parts, method)


def strongest(
    i: np.ndarray, j: np.ndarray, score: np.ndarray, k: int = MAX_LINKS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges (i, j, score) with at most ``k`` per ``i``, its highest scores (ties: smaller j)."""
    if len(i) <= k or np.bincount(i).max() <= k:
        return i, j, score
    order = np.lexsort((j, -score, i))
    i, j, score = i[order], j[order], score[order]
    rank = np.arange(len(i)) - np.searchsorted(i, i, side="left")
    keep = rank < k
    return i[keep], j[keep], score[keep]


@contextmanager
def _faiss_threads(threads: int) -> Iterator[None]:
    """faiss's (process-wide) OpenMP threads set to ``threads`` for a block; 0 leaves them."""
    import faiss

    before = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _nlist(n: int, nlist: int | None) -> int:
    """Inverted-file cells: 4·√n by default (faiss's guideline), at least 39 points per cell."""
    return max(1, min(nlist or int(4 * math.sqrt(n)), n // 39))


def cosine_pairs(
    chunks: Callable[[], Iterable[np.ndarray]],
    n: int,
    threshold: float,
    exact_limit: int | None = None,
    nprobe: int = NPROBE,
    nlist: int | None = None,
    threads: int = 0,
    stats: dict[str, float] | None = None,
) -> Pairs:
    """Pairs of L2-normalised vectors with cosine ``>= threshold``; score = the cosine.

    ``chunks()`` yields the (n_i, D) vectors in order, and may be called up to three times (train
    sample, index, query), so the approximate path never holds more than the index and one chunk.
    Above ``exact_limit`` rows the index is a faiss inverted file (``IndexIVFScalarQuantizer``,
    fp16 vectors, inner product): k-means cells (``nlist``, default 4·√n) trained on a strided
    sample, then a *range* search — the neighbours above the threshold (the MAX_LINKS strongest
    of each row kept, as on the exhaustive path) — probing the ``nprobe`` nearest cells of each
    query. ``stats``, when given, receives the index size and
    the train/add/search seconds.
    """
    limit = EXACT_LIMIT["semantic"] if exact_limit is None else exact_limit
    parts = []
    if n <= limit:
        blocks = [np.asarray(c, dtype=np.float32) for c in chunks()]
        emb = np.concatenate(blocks) if blocks else np.zeros((0, 1), np.float32)
        n = len(emb)
        for a in range(0, n, BLOCK):
            x = emb[a : a + BLOCK]
            for c in range(a, n, BLOCK):
                sims = x @ emb[c : c + BLOCK].T  # (B, B)
                ii, jj = np.nonzero(sims >= threshold)
                parts.append(strongest(ii + a, jj + c, sims[ii, jj]))
        return Pairs.concat(parts, "exact")
    with _faiss_threads(threads):
        return _ivf_cosine(chunks, n, threshold, nprobe, nlist, stats)


def semantic_ivf(dim: int, nlist: int) -> Any:
    """An untrained faiss inverted file for L2-normalised CLIP embeddings (inner product, fp16
    codes): the index semantic dedup searches above its exhaustive limit, and the app's
    "more like this" search too. Train it on about ``TRAIN_PER_CELL`` vectors per cell."""
    import faiss

    index = faiss.IndexIVFScalarQuantizer(
        faiss.IndexFlatIP(dim),
        dim,
        nlist,
        faiss.ScalarQuantizer.QT_fp16,
        faiss.METRIC_INNER_PRODUCT,
    )
    index.cp.niter = KMEANS_ITERS
    index.cp.max_points_per_centroid = TRAIN_PER_CELL
    return index


def _ivf_cosine(
    chunks: Callable[[], Iterable[np.ndarray]],
    n: int,
    threshold: float,
    nprobe: int,
    nlist: int | None,
    stats: dict[str, float] | None,
) -> Pairs:
    parts = []
    nlist = _nlist(n, nlist)
    stride = max(1, n // (TRAIN_PER_CELL * nlist))
    t0 = time.perf_counter()
    sample = np.concatenate(
        [
            np.asarray(c[(-offset) % stride :: stride], np.float32)
            for offset, c in _offsets(chunks())
        ]
    )
    dim = sample.shape[1]
    index = semantic_ivf(dim, nlist)
    index.train(sample)
    del sample
    t1 = time.perf_counter()
    for _, c in _offsets(chunks()):
        index.add(np.ascontiguousarray(c, dtype=np.float32))
    t2 = time.perf_counter()
    index.nprobe = min(nprobe, nlist)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-1)))  # faiss keeps ip > radius
    for offset, c in _offsets(chunks()):
        lims, sims, keys = index.range_search(np.ascontiguousarray(c, dtype=np.float32), radius)
        rows = np.repeat(np.arange(len(c), dtype=np.int64), np.diff(lims).astype(np.int64)) + offset
        ok = sims >= threshold
        parts.append(strongest(rows[ok], keys[ok].astype(np.int64), np.minimum(sims[ok], 1.0)))
    if stats is not None:
        stats.update(
            index_bytes=float(index.ntotal * (index.code_size + 8) + nlist * dim * 4),
            train_s=t1 - t0,
            add_s=t2 - t1,
            search_s=time.perf_counter() - t2,
            nlist=float(nlist),
        )
    return Pairs.concat(parts, "faiss-ivf")


def _offsets(chunks: Iterable[np.ndarray]) -> Iterable[tuple[int, np.ndarray]]:
    """(row offset, chunk) over ``chunks``."""
    offset = 0
    for c in chunks:
        yield offset, c
        offset += len(c)


def exact_pairs(digests: list[str | None]) -> Pairs:
    """Star edges (first, other) inside each run of equal, non-null digests."""
    idx = np.array([i for i, d in enumerate(digests) if d], dtype=np.int64)
    if len(idx) < 2:
        return Pairs.empty()
    vals = np.array([digests[i] for i in idx])
    order = np.argsort(vals, kind="stable")
    v, members = vals[order], idx[order]
    start = np.ones(len(v), dtype=bool)
    start[1:] = v[1:] != v[:-1]
    head = members[np.nonzero(start)[0]][np.cumsum(start) - 1]  # first member of each row's run
    dup = ~start
    return Pairs.concat([(head[dup], members[dup], np.ones(int(dup.sum()), np.float32))], "exact")


# ---- groups ---------------------------------------------------------------------------------
def keep_order(aesthetic: np.ndarray, pixels: np.ndarray, keys: list[str]) -> np.ndarray:
    """Rows in keep-priority order: highest aesthetic (null lowest), most pixels, smallest key."""
    n = len(keys)
    aes = np.where(np.isnan(aesthetic), -np.inf, aesthetic)
    key_rank = np.empty(n, dtype=np.int64)
    key_rank[np.argsort(np.array(keys, dtype=object), kind="stable")] = np.arange(n)
    return np.lexsort((key_rank, -pixels, -aes))


def group_duplicates(
    n: int,
    pairs: dict[str, Pairs],
    aesthetic: np.ndarray,
    pixels: np.ndarray,
    keys: list[str],
    order: np.ndarray | None = None,
) -> tuple[np.ndarray, list[str | None], np.ndarray]:
    """Duplicate groups formed around kept images → (keeper index per row, dup_kind per row,
    dup_score per row); a kept (or lone) row has keeper == itself and dup_kind None.

    Rows are visited in keep-priority order — highest aesthetic (null lowest), then most pixels,
    then smallest key. A row not yet assigned is kept, and every not-yet-assigned row within a
    threshold *of it* becomes its duplicate (SemDeDup's rule, over the whole store rather than per
    k-means cell: the IVF range search already crossed the cells). A duplicate never recruits
    others, so A~B and B~C with A and C far apart keep C: no chains, unlike connected components.

    Links reach further than the pair list through copies, which are exact equalities and cannot
    chain: byte copies (same sha256) have the same embedding, so a semantic link of one holds for
    all; images with the same phash (or byte copies) are at the same Hamming distance from any
    other. That matters because identical hashes and byte copies are searched once (a star from
    the first copy), and because at most MAX_LINKS links per image are kept: a swarm larger than
    that may keep more than one image, each with duplicates within the threshold.
    """
    empty = Pairs.empty()
    exact, phash, semantic = (pairs.get(k, empty) for k in KINDS)
    same_hash = phash.score >= 1.0  # identical hashes (distinct ones are >= 1 bit apart)
    byte_copy = _classes(n, [exact])
    same_phash = _classes(n, [exact, Pairs(phash.i[same_hash], phash.j[same_hash], phash.score)])
    ph_links = _class_links(
        same_phash, phash.i[~same_hash], phash.j[~same_hash], phash.score[~same_hash]
    )
    sem_links = _class_links(byte_copy, semantic.i, semantic.j, semantic.score)
    # Keep-priority order (``order``: `keep_order`, given when grouping the same rows again);
    # rows with no copy and no link are kept alone and not visited.
    if order is None:
        order = keep_order(aesthetic, pixels, keys)
    linked = (same_phash.size[same_phash.label] > 1) | (ph_links.degree[same_phash.label] > 0)
    linked |= sem_links.degree[byte_copy.label] > 0
    keeper = np.arange(n, dtype=np.int64)
    best = np.full(n, -1.0)  # kind priority * 10 + similarity of the link to the keeper
    assigned = np.zeros(n, dtype=bool)
    for r in order[linked[order]]:
        if assigned[r]:
            continue
        assigned[r] = True
        # candidates: (rows, kind priority * 10 + similarity to r)
        rows = [byte_copy.members(byte_copy.label[r]), same_phash.members(same_phash.label[r])]
        vals = [np.full(len(rows[0]), 31.0), np.full(len(rows[1]), 21.0)]
        for links, classes, prio in ((ph_links, same_phash, 20.0), (sem_links, byte_copy, 10.0)):
            other, score = links.of(classes.label[r])
            for c, s in zip(other.tolist(), score.tolist(), strict=True):
                m = classes.members(c)
                rows.append(m)
                vals.append(np.full(len(m), prio + s))
        cand, val = np.concatenate(rows), np.concatenate(vals)
        free = ~assigned[cand]
        cand, val = cand[free], val[free]
        if len(cand):
            np.maximum.at(best, cand, val)  # the strongest link of each to r
            keeper[cand] = r
            assigned[cand] = True
    kinds: list[str | None] = [None] * n
    scores = np.full(n, np.nan, dtype=np.float32)
    names = {v: k for k, v in _PRIORITY.items()}
    for r in np.nonzero(keeper != np.arange(n))[0]:
        prio = min(int(best[r] // 10), 3)  # 31 (a byte copy) is exact, score 1
        kinds[r] = names[prio]
        scores[r] = best[r] - 10.0 * prio
    return keeper, kinds, scores


@dataclass
class _Classes:
    """Equivalence classes of rows (components of equality links): label per row, members."""

    label: np.ndarray  # (n,) class id
    size: np.ndarray  # (classes,)
    _order: np.ndarray  # rows sorted by class
    _start: np.ndarray  # (classes + 1,) offsets into _order

    def members(self, c: int) -> np.ndarray:
        return self._order[self._start[c] : self._start[c + 1]]


def _classes(n: int, parts: list[Pairs]) -> _Classes:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    ii = np.concatenate([p.i for p in parts] + [np.zeros(0, np.int64)])
    jj = np.concatenate([p.j for p in parts] + [np.zeros(0, np.int64)])
    graph = coo_matrix((np.ones(len(ii), dtype=np.int8), (ii, jj)), shape=(n, n))
    k, label = connected_components(graph, directed=False) if n else (0, np.zeros(0, np.int64))
    size = np.bincount(label, minlength=k)
    start = np.concatenate([[0], np.cumsum(size)])
    return _Classes(label, size, np.argsort(label, kind="stable"), start)


@dataclass
class _Links:
    """Symmetric links between classes, as CSR: the classes linked to c and the similarities."""

    degree: np.ndarray
    _other: np.ndarray
    _score: np.ndarray
    _start: np.ndarray

    def of(self, c: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(self._start[c], self._start[c + 1])
        return self._other[sl], self._score[sl]


def _class_links(classes: _Classes, i: np.ndarray, j: np.ndarray, score: np.ndarray) -> _Links:
    a, b = classes.label[i], classes.label[j]
    keep = a != b
    src = np.concatenate([a[keep], b[keep]])
    dst = np.concatenate([b[keep], a[keep]])
    s = np.concatenate([score[keep], score[keep]]).astype(np.float64)
    order = np.argsort(src, kind="stable")
    degree = np.bincount(src, minlength=len(classes.size))
    start = np.concatenate([[0], np.cumsum(degree)])
    return _Links(degree, dst[order], s[order], start)


def removed_by_threshold(
    n: int,
    pairs: dict[str, Pairs],
    aesthetic: np.ndarray,
    pixels: np.ndarray,
    keys: list[str],
    cfg: DedupConfig,
) -> dict[str, np.ndarray]:
    """Which rows each threshold would remove: {label: (n,) bool}, e.g. ``"phash<=6"``. A phash or
    semantic threshold counts its own links plus the byte copies; only thresholds at least as
    strict as the configured one can be told from the pairs found. ``"exact"`` is byte copies
    alone; ``"all"`` is what this run wrote."""
    rows, order = np.arange(n), keep_order(aesthetic, pixels, keys)

    def removed(parts: dict[str, Pairs]) -> np.ndarray:
        return group_duplicates(n, parts, aesthetic, pixels, keys, order)[0] != rows

    exact = pairs.get("exact", Pairs.empty())
    out = {"exact": removed({"exact": exact})}
    if "phash" in pairs:
        p = pairs["phash"]
        for t in sorted({cfg.phash_threshold, *range(0, cfg.phash_threshold, 2)}, reverse=True):
            keep = p.score >= 1.0 - t / 64.0 - 1e-6
            out[f"phash<={t}"] = removed(
                {"exact": exact, "phash": Pairs(p.i[keep], p.j[keep], p.score[keep])}
            )
    if "semantic" in pairs:
        p, t0 = pairs["semantic"], cfg.semantic_threshold
        for t in sorted({t0, *(t for t in SEMANTIC_SWEEP if t > t0)}):
            keep = p.score >= t
            out[f"semantic>={t:g}"] = removed(
                {"exact": exact, "semantic": Pairs(p.i[keep], p.j[keep], p.score[keep])}
            )
    out["all"] = removed(pairs)
    return out


# ---- the store-level entry ------------------------------------------------------------------
@dataclass
class DedupSummary:
    rows: int = 0
    groups: int = 0
    duplicates: Counter = field(default_factory=Counter)  # by kind
    methods: dict[str, str] = field(default_factory=dict)  # kind -> exact | faiss-ivf
    removed: dict[str, int] = field(default_factory=dict)  # threshold label -> rows removed
    unchanged: bool = False
    seconds: float = 0.0
    tag: str = ""

    def lines(self) -> list[str]:
        if self.unchanged:
            return [f"{STAGE}: inputs and settings unchanged since the last run; nothing to do"]
        total = sum(self.duplicates.values())
        out = [
            f"{STAGE}: {self.rows} rows (embeddings/scores from '{self.tag}'), {self.groups} duplicate "
            f"group(s), {total} duplicate(s) marked with dup_of in {self.seconds:.1f}s"
        ]
        for kind in KINDS:
            if kind in self.methods:
                out.append(
                    f"  {kind:<8} {self.duplicates.get(kind, 0):>8}   search: {self.methods[kind]}"
                )
        if self.removed:
            out.append("  removed at each threshold: " + removed_line(self.removed, self.rows))
        return out


def removed_line(removed: dict[str, int], rows: int) -> str:
    """``{"phash<=8": 4, "exact": 1, …}`` → ``exact 1 (10.0%) · phash<=8 4 (40.0%) · …``: exact,
    then each kind from its loosest threshold to its strictest, then all."""

    def order(label: str) -> tuple[int, float]:
        kind, _, t = label.partition("<=") if "<=" in label else label.partition(">=")
        rank = {"exact": 0, "phash": 1, "semantic": 2}.get(kind, 3)
        return rank, (-float(t) if kind == "phash" else float(t or 0))

    return " · ".join(
        f"{k} {removed[k]} ({removed[k] / max(rows, 1):.1%})" for k in sorted(removed, key=order)
    )


def score_tags(store: Store) -> list[str]:
    return sorted(
        s.split("/", 1)[1] for s in store.stages() if s.startswith("scores/") and s != STAGE
    )


def choose_tag(store: Store, tag: str | None) -> str:
    tags = score_tags(store)
    if tag is not None:
        if tag not in tags:
            raise StoreError(
                f"no scores/{tag} in {store.root} (score tags: {', '.join(tags) or 'none'})"
            )
        return tag
    if not tags:
        raise StoreError(
            f"no scores in {store.root}; run 'alphaset score --store {store.root}' first"
        )
    if len(tags) > 1:
        raise UserError(f"several score tags ({', '.join(tags)}); choose one with --embeddings TAG")
    return tags[0]


def _inputs_digest(store: Store, stages: list[str], shards: list[str]) -> str:
    h = hashlib.sha256()
    for stage in stages:
        done = store.completed(stage)
        missing = [s for s in shards if s not in done]
        if missing:
            raise StoreError(
                f"{stage} lacks shard(s) {', '.join(missing[:5])}; run 'alphaset score --store "
                f"{store.root}' until every shard is scored, then dedup"
            )
        for s in shards:
            h.update(f"{stage} {s} {done[s].get('checksum')}\n".encode())
    return h.hexdigest()


def dedup_store(store: Store | str, cfg: DedupConfig) -> DedupSummary:
    """Find duplicates across ``store`` and write ``scores/dedup`` (see the module docstring).

    Holds the ``scores/dedup`` lease throughout: a second dedup of the same store is refused with
    one line naming this one, while other stages run side by side."""
    store = Store(store) if isinstance(store, str) else store
    store.require()
    with store.lease(STAGE) as lease, store.writing(STAGE, lease=lease):
        return _dedup(store, cfg, lease)


def _dedup(store: Store, cfg: DedupConfig, lease: Any) -> DedupSummary:
    start = time.perf_counter()
    tag = choose_tag(store, cfg.embeddings)
    shards = store.shards()
    # 1. Skip when the inputs and settings are those of the last complete run.
    inputs = ["ingest", f"scores/{tag}"] + ([f"embeddings/{tag}"] if cfg.semantic else [])
    settings = {
        "embeddings": tag,
        "phash_threshold": cfg.phash_threshold,
        "semantic_threshold": cfg.semantic_threshold if cfg.semantic else None,
        # the search (a rerun with more probes may find more pairs)
        "search": {
            "exact_limit": cfg.exact_limit,
            "nprobe": cfg.nprobe if cfg.semantic else None,
            "phash_nprobe": cfg.phash_nprobe,
        },
        "inputs": _inputs_digest(store, inputs, shards),
    }
    old = store.stage_config(STAGE)
    if (
        old is not None
        and old.get("settings") == settings
        and set(store.completed(STAGE)) >= set(shards)
    ):
        return DedupSummary(unchanged=True, tag=tag, seconds=time.perf_counter() - start)
    # 2. Gather every row's facts, in shard order.
    rows = _load_rows(store, tag, shards)
    n = len(rows["key"])
    summary = DedupSummary(rows=n, tag=tag)
    pairs = _pairs(store, tag, shards, rows, cfg)
    summary.methods = {kind: p.method for kind, p in pairs.items()}
    # 3. Groups and keepers.
    keeper, kinds, scores = group_duplicates(
        n, pairs, rows["aesthetic"], rows["pixels"], rows["key"]
    )
    is_dup = keeper != np.arange(n)
    summary.groups = len(set(keeper[is_dup].tolist()))
    summary.duplicates.update(k for k in kinds if k is not None)
    sweep = removed_by_threshold(n, pairs, rows["aesthetic"], rows["pixels"], rows["key"], cfg)
    summary.removed = {label: int(r.sum()) for label, r in sweep.items()}
    # 4. Write: the old config goes first, so a crash midway means 'changed' and a full rerun.
    lease.check()
    fs.remove(fs.join(store.status_dir(STAGE), "config.json"))
    offset = 0
    for shard in shards:
        m = rows["per_shard"][shard]
        sl = slice(offset, offset + m)
        dup_of = [rows["key"][keeper[r]] if is_dup[r] else None for r in range(sl.start, sl.stop)]
        table = pa.table(
            {
                "key": pa.array(rows["key"][sl], pa.string()),
                "dup_of": pa.array(dup_of, pa.string()),
                "dup_kind": pa.array(kinds[sl], pa.string()),
                "dup_score": pa.array(scores[sl], pa.float32(), mask=np.isnan(scores[sl])),
                "error": pa.array(rows["error"][sl], pa.string()),
            }
        )
        checksum = fs.write_parquet(fs.join(store.stage_dir(STAGE), f"{shard}.parquet"), table)
        n_err = sum(e is not None for e in rows["error"][sl])
        store.write_status(
            STAGE,
            shard,
            {
                "rows": m,
                "ok": m - n_err,
                "errors": n_err,
                "errors_by_reason": dict(Counter("not scored" for e in rows["error"][sl] if e)),
                "duplicates": sum(d is not None for d in dup_of),
                # per threshold, this shard's rows it removes (summed by `manifest stats`)
                "removed_by_threshold": {k: int(r[sl].sum()) for k, r in sweep.items()},
                "checksum": checksum,
                "output": f"{shard}.parquet",
                "model": f"dedup over scores/{tag}",
                "settings": settings,
                "seconds": round(time.perf_counter() - start, 3),
            },
        )
        offset += m
    store.claim_stage(STAGE, settings)
    store.refresh_manifest()
    summary.seconds = time.perf_counter() - start
    return summary


def find_pairs(store: Store | str, cfg: DedupConfig) -> tuple[list[str], dict[str, Pairs]]:
    """The rows' keys and the linked pairs by kind, without grouping or writing (inspection)."""
    store = Store(store) if isinstance(store, str) else store
    tag, shards = choose_tag(store, cfg.embeddings), store.shards()
    rows = _load_rows(store, tag, shards)
    return rows["key"], _pairs(store, tag, shards, rows, cfg)


def _pairs(
    store: Store, tag: str, shards: list[str], rows: dict[str, Any], cfg: DedupConfig
) -> dict[str, Pairs]:
    pairs = {"exact": exact_pairs(rows["sha256"])}
    pairs["exact"].method = "sha256"
    has_hash = np.nonzero([h is not None for h in rows["phash"]])[0]
    hashes = np.array([int(rows["phash"][i], 16) for i in has_hash], dtype=np.uint64)
    p = hamming_pairs(
        hashes, cfg.phash_threshold, cfg.exact_limit, cfg.phash_nprobe, threads=cfg.threads
    )
    pairs["phash"] = Pairs(has_hash[p.i], has_hash[p.j], p.score, p.method)
    if cfg.semantic:
        pairs["semantic"] = _semantic(store, tag, shards, rows, cfg)
    return pairs


def _load_rows(store: Store, tag: str, shards: list[str]) -> dict[str, Any]:
    """Per row (ok meta rows, shard order): key, sha256, phash, aesthetic, pixels, error."""
    out: dict[str, Any] = {"key": [], "sha256": [], "phash": [], "error": [], "per_shard": {}}
    aes, pixels = [], []
    for shard in shards:
        meta = store.read_meta(shard, ["key", "status", "sha256", "width", "height"]).to_pydict()
        ok = [i for i, s in enumerate(meta["status"]) if s == "ok"]
        sc = fs.read_parquet(
            fs.join(store.stage_dir(f"scores/{tag}"), f"{shard}.parquet"),
            columns=["key", "error", "phash", "clip_aesthetic", "width", "height"],
        ).to_pydict()
        by_key = {k: i for i, k in enumerate(sc["key"])}
        for i in ok:
            key = meta["key"][i]
            j = by_key.get(key)
            out["key"].append(key)
            out["sha256"].append(meta["sha256"][i])
            err = "not scored" if j is None else sc["error"][j]
            out["error"].append(f"not scored: {err}" if err else None)
            out["phash"].append(sc["phash"][j] if j is not None and not err else None)
            a = sc["clip_aesthetic"][j] if j is not None else None
            aes.append(np.nan if a is None else a)
            w = (sc["width"][j] if j is not None else None) or meta["width"][i] or 0
            h = (sc["height"][j] if j is not None else None) or meta["height"][i] or 0
            pixels.append(w * h)
        out["per_shard"][shard] = len(ok)
    out["aesthetic"] = np.array(aes, dtype=np.float64)
    out["pixels"] = np.array(pixels, dtype=np.int64)
    return out


def _semantic(
    store: Store, tag: str, shards: list[str], rows: dict[str, Any], cfg: DedupConfig
) -> Pairs:
    """Cosine pairs over the rows that have an embedding, read shard by shard. Of rows with the
    same sha256 only the first is searched: the exact pairs already link the others to it."""
    pos = {k: r for r, k in enumerate(rows["key"])}
    seen: set[str] = set()
    first = np.ones(len(rows["key"]), dtype=bool)
    for r, digest in enumerate(rows["sha256"]):
        if digest is not None:
            first[r] = digest not in seen
            seen.add(digest)
    index_of: list[np.ndarray] = []  # per shard: row indices of its searched keys

    def chunks() -> Iterable[np.ndarray]:
        fill = not index_of
        for shard in shards:
            url = fs.join(store.stage_dir(f"embeddings/{tag}"), f"{shard}.parquet")
            t = fs.read_parquet(url, ["key", "embedding"])
            t = t.filter(t["embedding"].is_valid())
            col = t["embedding"].combine_chunks()
            vec = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)
            try:
                idx = np.array([pos[k] for k in t["key"].to_pylist()], dtype=np.int64)
            except KeyError as e:
                raise StoreError(
                    f"{url} has key {e} that meta does not list as ok; re-run score"
                ) from None
            keep = first[idx]
            if fill:
                index_of.append(idx[keep])
            if keep.any():
                yield vec[keep].astype(np.float32)

    n = sum(store.completed(f"embeddings/{tag}")[s].get("ok", 0) for s in shards)
    n -= int((~first).sum())  # byte copies are not searched
    p = cosine_pairs(
        chunks, n, cfg.semantic_threshold, cfg.exact_limit, cfg.nprobe, threads=cfg.threads
    )
    rows_of = np.concatenate(index_of) if index_of else np.zeros(0, np.int64)
    return Pairs(rows_of[p.i], rows_of[p.j], p.score, p.method)
