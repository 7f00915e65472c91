"""Benchmark: dedup search cost — time, memory, recall — of the semantic (CLIP cosine) and phash
(Hamming) searches of `alphaset dedup`, and the sizes below which the exhaustive searches win
(`curation.dedup.EXACT_LIMIT`).

Data: --n random unit vectors (768-d by default, CLIP ViT-L/14 width) stored as float16 like the
embeddings shards, plus --plant near copies (cosine ~0.97) whose recovery is the recall; --phash-n
random 64-bit hashes plus planted copies 6 bits apart. Random data is the hardest case for an
inverted file (no cluster structure), so real CLIP embeddings and phashes do better. The searches
are `curation.dedup.cosine_pairs` / `hamming_pairs` themselves, fed in shard-sized chunks as
`alphaset dedup` feeds them.

Output: seconds, peak-RSS growth and recall of each search, the exhaustive/IVF crossover, and a
projection to --target vectors (IVF: train ~ nlist² , assign ~ N·nlist, probe ~ N²·nprobe/nlist
with nlist = 4√N, so all three ~ N^1.5; memory ~ N; exhaustive ~ N²).

    .venv/bin/python bench/dedup.py --n 1000000 --phash-n 1000000
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from curation.dedup import NPROBE, NPROBE_PHASH, cosine_pairs, hamming_pairs  # noqa: E402

CHUNK = 50_000  # vectors per chunk, like one large embeddings shard


def peak_rss_reset() -> None:
    """Reset VmHWM so the next reading is the peak of the next phase (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def rss_gb(field: str = "VmHWM") -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def make_vectors(
    n: int, dim: int, plant: int, seed: int = 0
) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """(n + plant, dim) float16 unit vectors; the last ``plant`` are noisy copies of random earlier ones."""
    rng = np.random.default_rng(seed)
    out = np.empty((n + plant, dim), dtype=np.float16)
    for a in range(0, n, CHUNK):
        x = rng.standard_normal((min(CHUNK, n - a), dim), dtype=np.float32)
        out[a : a + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    src = rng.choice(n, plant, replace=False)
    noisy = out[src].astype(np.float32) + (0.25 / math.sqrt(dim)) * rng.standard_normal(
        (plant, dim), dtype=np.float32
    )
    out[n:] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    return out, {(int(s), n + i) for i, s in enumerate(src)}


def run_cosine(
    x: np.ndarray, threshold: float, exact_limit: int | None, threads: int, nprobe: int = NPROBE
):
    def chunks():
        for a in range(0, len(x), CHUNK):
            yield x[a : a + CHUNK].astype(np.float32)

    base = rss_gb("VmRSS")
    peak_rss_reset()
    stats: dict[str, float] = {"index_bytes": 0.0}
    start, cpu = time.perf_counter(), time.process_time()
    pairs = cosine_pairs(
        chunks, len(x), threshold, exact_limit, nprobe, threads=threads, stats=stats
    )
    stats["cpu_s"] = time.process_time() - cpu
    return pairs, time.perf_counter() - start, rss_gb() - base, stats


def planted_hashes(n: int, plant: int, bits: int = 6, seed: int = 1):
    """(n + plant) uint64 hashes; the last ``plant`` are copies of random earlier ones with
    ``bits`` bits flipped."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + rng.integers(
        0, 2, n, dtype=np.uint64
    )
    src = rng.choice(n, plant, replace=False)
    flips = np.zeros(plant, dtype=np.uint64)
    for i in range(plant):
        for b in rng.choice(64, bits, replace=False):
            flips[i] |= np.uint64(1) << np.uint64(b)
    return np.concatenate([h, h[src] ^ flips]), {(int(s), n + i) for i, s in enumerate(src)}


def recall_of(pairs, planted: set[tuple[int, int]]) -> tuple[float, int]:
    found = set(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True))
    return len(found & planted) / max(1, len(planted)), len(found - planted)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1_000_000, help="vectors for the IVF run (default 1M)")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--plant", type=int, default=1000, help="planted near copies (recall check)")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--nprobe", type=int, default=NPROBE, help=f"semantic (default {NPROBE})")
    ap.add_argument(
        "--phash-nprobe", type=int, default=NPROBE_PHASH, help=f"(default {NPROBE_PHASH})"
    )
    ap.add_argument(
        "--exact-sizes", default="20000,50000,100000", help="sizes timed with both searches"
    )
    ap.add_argument("--threads", type=int, default=0, help="faiss threads (0: all cores)")
    ap.add_argument(
        "--phash-n", type=int, default=1_000_000, help="64-bit hashes for the phash search"
    )
    ap.add_argument("--target", type=int, default=25_000_000, help="projection size")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    print(
        f"machine: {cores} cores, load avg {os.getloadavg()[0]:.1f}; dim {args.dim}, threshold {args.threshold}"
    )

    # 1. Crossover: the exhaustive blockwise search against the IVF at small sizes (CPU seconds:
    #    on a shared machine wall time measures the neighbours as much as the code).
    print("\nsize      exhaustive (cpu / wall)   faiss IVF (cpu / wall, recall)")
    cross = []
    for size in [int(s) for s in args.exact_sizes.split(",") if s]:
        x, planted = make_vectors(size, args.dim, args.plant)
        _, te, _, se = run_cosine(x, args.threshold, len(x), args.threads, args.nprobe)
        pairs, tu, _, su = run_cosine(x, args.threshold, 0, args.threads, args.nprobe)
        cross.append((len(x), se["cpu_s"], su["cpu_s"]))
        print(
            f"{len(x):>8}  {se['cpu_s']:>7.1f} s / {te:>6.1f} s   {su['cpu_s']:>9.1f} s / {tu:>6.1f} s"
            f"  {recall_of(pairs, planted)[0]:.3f}"
        )

    # 2. The IVF path at --n, with planted near copies.
    x, planted = make_vectors(args.n, args.dim, args.plant)
    pairs, t, mem, stats = run_cosine(x, args.threshold, 0, args.threads, args.nprobe)
    recall, other = recall_of(pairs, planted)
    n, cpu = len(x), stats["cpu_s"]
    index_gb = stats["index_bytes"] / 1024**3
    print(
        f"\nfaiss IVF (fp16 vectors, {stats['nlist']:.0f} cells, nprobe {args.nprobe}), {n} vectors "
        f"({x.nbytes / 1024**3:.2f} GB fp16):"
    )
    print(f"  wall {t:.0f} s (train {stats['train_s']:.0f} + add {stats['add_s']:.0f} + search {stats['search_s']:.0f} s), "
          f"CPU {cpu:.0f} s = {n / cpu:.0f} vectors per CPU-second")  # fmt: skip
    print(f"  index {index_gb:.3f} GB ({stats['index_bytes'] / n:.0f} B/vector), peak RSS growth {mem:.2f} GB "
          f"(index + one fp32 chunk of {CHUNK}); planted recall {recall:.3f}, {other} other pairs")  # fmt: skip
    del x

    # 3. Hamming (phash) search at --phash-n: exhaustive and IVF.
    h, hp = planted_hashes(args.phash_n, args.plant)
    c0 = time.process_time()
    pe = hamming_pairs(h, 8, exact_limit=len(h), threads=args.threads)
    c1 = time.process_time()
    ps: dict[str, float] = {}
    pi = hamming_pairs(
        h, 8, exact_limit=0, nprobe=args.phash_nprobe, threads=args.threads, stats=ps
    )
    c2 = time.process_time()
    print(
        f"\nphash, {len(h)} hashes (threshold 8, copies 6 bits apart): exhaustive {c1 - c0:.1f} CPU-s "
        f"(recall {recall_of(pe, hp)[0]:.3f}); IVF nprobe {args.phash_nprobe}: {c2 - c1:.1f} CPU-s "
        f"(train {ps['train_s']:.0f} + add {ps['add_s']:.0f} + search {ps['search_s']:.0f} s wall), "
        f"recall {recall_of(pi, hp)[0]:.3f}"
    )

    # 4. Projections from CPU seconds (IVF ~ N^1.5; exhaustive ~ N^2; memory ~ N).
    big = args.target
    cpu_big = cpu * (big / n) ** 1.5
    if cross:
        size, ce, cu = cross[-1]
        print(
            f"\nexhaustive projected: {big:,} → {ce * (big / size) ** 2 / 3600 / 64:,.0f} h on 64 cores"
        )
        crossed = [s for s, e, u in cross if u < e]
        print(f"smallest timed size where the IVF is cheaper: {crossed[0] if crossed else 'none'}")
    print(f"semantic IVF projected for {big:,}: {cpu_big / 3600:,.1f} CPU-hours "
          f"(≈ {cpu_big / 3600 / 64 * 60:.0f} min on 64 cores), index ≈ {stats['index_bytes'] / n * big / 1024**3:.0f} GB")  # fmt: skip
    ph_big = (c2 - c1) * (big / len(h)) ** 1.5
    print(f"phash IVF projected for {big:,}: {ph_big / 3600:,.1f} CPU-hours; "
          f"exhaustive {(c1 - c0) * (big / len(h)) ** 2 / 3600:,.0f} CPU-hours")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
