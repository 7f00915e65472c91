import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from curation.dedup import (
    DedupConfig,
    Pairs,
    cosine_pairs,
    dedup_store,
    exact_pairs,
    find_pairs,
    group_duplicates,
    hamming_pairs,
)
from pipeline import fs
from pipeline.cli import main
from pipeline.errors import UserError
from pipeline.store import Store, StoreError

# made by the dup_photos fixture (tests/curation/conftest.py)
NEAR_COPIES = ("astronaut_small", "astronaut_q30", "astronaut_crop2")
EXACT_COPY = "coffee_copy"


def dedup_rows(store: Store) -> dict[str, dict]:
    rows = pq.read_table(store.stage_dir("scores/dedup")).to_pylist()
    return {r["key"]: r for r in rows}


def aesthetic_by_key(store: Store) -> dict[str, float]:
    t = pq.read_table(store.stage_dir("scores/tiny"), columns=["key", "clip_aesthetic"]).to_pydict()
    return dict(zip(t["key"], t["clip_aesthetic"], strict=True))


@pytest.mark.parametrize("exact_limit", [None, 0], ids=["exhaustive", "faiss-ivf"])
def test_near_and_exact_copies_are_grouped_and_other_photos_are_not(
    scored_store, keys_by_name, exact_limit
):
    summary = dedup_store(scored_store, DedupConfig(semantic=False, exact_limit=exact_limit))
    method = "exact" if exact_limit is None else "faiss-ivf"
    assert summary.methods == {"exact": "sha256", "phash": method}
    names = keys_by_name(scored_store)
    rows = dedup_rows(scored_store)
    assert set(rows) == set(names.values())
    # astronaut and its resized / re-compressed / cropped copies: one group, kept by aesthetic
    group = [names[n] for n in ("astronaut", *NEAR_COPIES)]
    aes = aesthetic_by_key(scored_store)
    keeper = max(group, key=lambda k: aes[k])
    assert rows[keeper]["dup_of"] is None
    for k in group:
        if k != keeper:
            assert rows[k]["dup_of"] == keeper and rows[k]["dup_kind"] == "phash"
            assert 1 - 8 / 64 <= rows[k]["dup_score"] <= 1.0
    # the byte-identical copy of coffee is an exact duplicate
    pair = sorted([names["coffee"], names[EXACT_COPY]], key=lambda k: -aes[k])
    assert rows[pair[1]]["dup_of"] == pair[0] and rows[pair[1]]["dup_kind"] == "exact"
    assert rows[pair[1]]["dup_score"] == 1.0
    # the other photos stay alone
    for n in ("chelsea", "rocket", "camera", "immunohistochemistry"):
        assert rows[names[n]]["dup_of"] is None and rows[names[n]]["dup_kind"] is None
    assert summary.duplicates == {"phash": 3, "exact": 1} and summary.groups == 2
    for shard in scored_store.shards():
        out = pq.read_table(fs.join(scored_store.stage_dir("scores/dedup"), f"{shard}.parquet"))
        assert out.column_names == ["key", "dup_of", "dup_kind", "dup_score", "error"]
        assert out["key"].to_pylist() == scored_store.ok_keys(shard)
        assert scored_store.status("scores/dedup", shard)["rows"] == out.num_rows


@pytest.mark.parametrize("exact_limit", [None, 0], ids=["exhaustive", "faiss-ivf"])
def test_semantic_pairs_at_a_high_threshold_link_only_copies(
    scored_store, keys_by_name, exact_limit
):
    """With a random CLIP only (near-)identical pixels are reliably close: the resized,
    re-compressed and cropped astronauts must be linked and no two different photos may be;
    lower thresholds are meaningless here. The byte copy of coffee is not searched (its exact
    pair links it). The IVF path reads the embedding shards three times (train, add, search)."""
    cfg = DedupConfig(semantic_threshold=0.999, exact_limit=exact_limit)
    keys, pairs = find_pairs(scored_store, cfg)
    names = {k: n for n, k in keys_by_name(scored_store).items()}
    linked = {
        frozenset((names[keys[i]], names[keys[j]]))
        for i, j in zip(pairs["semantic"].i.tolist(), pairs["semantic"].j.tolist(), strict=True)
    }
    assert frozenset(("astronaut", "astronaut_q30")) in linked
    assert not any(EXACT_COPY in pair for pair in linked)
    base = {n.split("_")[0] for pair in linked for n in pair}
    for pair in linked:
        assert len({n.split("_")[0] for n in pair}) == 1, pair  # same source photo
    assert base == {"astronaut"}
    assert pairs["semantic"].method == ("exact" if exact_limit is None else "faiss-ivf")
    assert np.all(pairs["semantic"].score >= 0.999)


def test_rerun_skips_when_nothing_changed_and_reruns_on_change(scored_store):
    cfg = DedupConfig(semantic=False, phash_threshold=7)  # settings no other test uses
    first = dedup_store(scored_store, cfg)
    assert not first.unchanged
    assert dedup_store(scored_store, cfg).unchanged
    assert not dedup_store(scored_store, DedupConfig(semantic=False, phash_threshold=4)).unchanged
    # a changed input shard (its status checksum) means a full rerun
    rec = scored_store.status("scores/tiny", "000001")
    scored_store.write_status("scores/tiny", "000001", {**rec, "checksum": "0" * 64})
    try:
        assert not dedup_store(
            scored_store, DedupConfig(semantic=False, phash_threshold=4)
        ).unchanged
    finally:
        scored_store.write_status("scores/tiny", "000001", rec)


def test_dedup_needs_scores(photos_dir, tmp_path, make_store, capsys):
    store = make_store(tmp_path / "store", photos_dir)
    with pytest.raises(StoreError, match="run 'alphaset score"):
        dedup_store(store, DedupConfig())
    assert main(["dedup", "--store", store.root]) == 2
    assert "no scores in" in capsys.readouterr().err
    assert main(["dedup", "--store", store.root, "--phash-threshold", "40"]) == 2
    assert "--phash-threshold must be in 0..32" in capsys.readouterr().err
    assert main(["dedup", "--store", store.root, "--nprobe", "0"]) == 2
    assert "argument --nprobe: must be > 0, got 0" in capsys.readouterr().err


def test_cli_dedup_prints_summary(scored_store, capsys):
    assert (
        main(["dedup", "--store", scored_store.root, "--no-semantic", "--phash-threshold", "6"])
        == 0
    )
    out = capsys.readouterr().out
    assert "scores/dedup: 10 rows" in out and "phash" in out


# ---- the search and grouping code on synthetic data ------------------------------------------
def planted_vectors(n=3000, dim=64, copies=40, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    src = rng.choice(n, copies, replace=False)
    dst = np.arange(n, n + copies)
    x = np.concatenate([x, x[src] + noise * rng.standard_normal((copies, dim)).astype(np.float32)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, set(zip(src.tolist(), dst.tolist(), strict=True))


@pytest.mark.parametrize("exact_limit", [None, 0], ids=["blockwise", "faiss-ivf"])
def test_cosine_pairs_find_planted_near_copies(exact_limit):
    x, planted = planted_vectors()
    chunks = lambda: (x[a : a + 700] for a in range(0, len(x), 700))  # noqa: E731
    stats: dict[str, float] = {}
    p = cosine_pairs(chunks, len(x), 0.98, exact_limit=exact_limit, stats=stats)
    assert p.method == ("exact" if exact_limit is None else "faiss-ivf")
    if exact_limit == 0:
        # 4·√n cells, capped at 39 training points per cell (faiss's minimum)
        assert stats["nlist"] == min(int(4 * math.sqrt(len(x))), len(x) // 39) > 1
    assert (
        set(zip(p.i.tolist(), p.j.tolist(), strict=True)) == planted
    )  # random pairs are ~0 cosine
    assert np.all(p.score >= 0.98) and np.all(p.i < p.j)


@pytest.mark.parametrize("exact_limit", [None, 0], ids=["exhaustive", "faiss-ivf"])
def test_hamming_pairs_find_flipped_hashes(exact_limit):
    rng = np.random.default_rng(1)
    h = rng.integers(0, 2**63, size=5000, dtype=np.uint64) * np.uint64(2) + rng.integers(
        0, 2, 5000, dtype=np.uint64
    )
    copies = h[:30] ^ np.uint64(0b1011_0001)  # 4 bits flipped
    p = hamming_pairs(np.concatenate([h, copies]), 5, exact_limit=exact_limit)
    assert p.method == ("exact" if exact_limit is None else "faiss-ivf")
    found = set(zip(p.i.tolist(), p.j.tolist(), strict=True))
    assert found == {(i, 5000 + i) for i in range(30)}
    assert np.allclose(p.score, 1 - 4 / 64)


def test_exact_pairs_link_equal_digests():
    p = exact_pairs(["a", "b", "a", None, "a", "b", None])
    assert sorted(zip(p.i.tolist(), p.j.tolist(), strict=True)) == [(0, 2), (0, 4), (1, 5)]


def test_group_keeps_best_image_and_strongest_link():
    keys = ["k0", "k1", "k2", "k3", "k4", "k5"]
    pairs = {
        "exact": Pairs(np.array([0]), np.array([1]), np.array([1.0], np.float32)),
        "phash": Pairs(np.array([1, 3]), np.array([2, 4]), np.array([0.9, 0.95], np.float32)),
        "semantic": Pairs(np.array([0]), np.array([2]), np.array([0.97], np.float32)),
    }
    aes = np.array([5.0, 7.0, np.nan, 6.0, 6.0, 9.0])
    pixels = np.array([10, 10, 10, 100, 400, 10])
    keeper, kinds, scores = group_duplicates(6, pairs, aes, pixels, keys)
    # group {0,1,2}: k1 has the highest aesthetic; group {3,4}: equal aesthetic → more pixels
    assert keeper.tolist() == [1, 1, 1, 4, 4, 5]
    assert kinds == ["exact", None, "phash", "phash", None, None]
    assert scores[0] == 1.0 and scores[2] == pytest.approx(0.9) and scores[3] == pytest.approx(0.95)
    # ties on aesthetic and pixels → smallest key
    keeper, _, _ = group_duplicates(2, {"exact": Pairs(np.array([0]), np.array([1]), np.ones(1, np.float32))},
                                    np.array([1.0, 1.0]), np.array([5, 5]), ["b", "a"])  # fmt: skip
    assert keeper.tolist() == [1, 1]


def test_bad_thresholds_are_rejected():
    with pytest.raises(UserError, match="--semantic-threshold must be a cosine in"):
        DedupConfig(semantic_threshold=1.5)
    with pytest.raises(UserError, match="--phash-threshold must be in 0..32"):
        DedupConfig(phash_threshold=-1)


@pytest.mark.parametrize("exact_limit", [None, 0], ids=["exhaustive", "faiss-ivf"])
def test_big_groups_stay_linear_and_whole(exact_limit):
    """A placeholder image seen m times gives m - 1 links, not m²/2, and a swarm of near copies
    keeps at most MAX_LINKS links per image — still one group."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from curation.dedup import MAX_LINKS, strongest

    rng = np.random.default_rng(5)
    base = rng.integers(0, 2**63, size=4000, dtype=np.uint64)
    same = np.full(600, base[0])  # identical hashes: one search, a star of 599 links
    flips = np.uint64(1) << rng.integers(0, 64, 600).astype(np.uint64)
    near = base[1] ^ flips  # 600 hashes 1 bit from base[1]: 2 bits from one another at most
    h = np.concatenate([base, same, near])
    p = hamming_pairs(h, 4, exact_limit=exact_limit)
    assert len(p) <= 600 + 601 * MAX_LINKS
    n = len(h)
    graph = coo_matrix((np.ones(len(p)), (p.i, p.j)), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    assert len(set(label[[0, *range(4000, 4600)]])) == 1
    assert len(set(label[[1, *range(4600, 5200)]])) == 1
    assert label[0] != label[1]
    i, j, s = strongest(
        np.array([0, 0, 0, 1]), np.array([3, 1, 2, 0]), np.array([0.5, 0.9, 0.9, 1]), 2
    )
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == [(0, 1), (0, 2), (1, 0)]
