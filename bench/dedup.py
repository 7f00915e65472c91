"""Benchmark: semantic (and phash) dedup search cost — time and memory — and the size below which
the exact blockwise search beats the usearch HNSW index (`curation.dedup.EXACT_LIMIT`).

Data: --n random unit vectors (768-d by default, CLIP ViT-L/14 width) stored as float16 like the
embeddings shards, plus --plant near copies (cosine ~0.97) whose recovery is the recall. Random
high-dimensional vectors are the hardest case for HNSW (no cluster structure), so real CLIP
embeddings index faster than this. The search is `curation.dedup.cosine_pairs` itself, fed in
shard-sized chunks as `alphaset dedup` feeds it.

Output: seconds and peak-RSS growth of each search, the exact/usearch crossover, and a projection
to 25M vectors (HNSW cost ~ N log N, memory ~ N; exact blockwise ~ N^2).

    .venv/bin/python bench/dedup.py --n 100000 --exact-sizes 5000,10000,20000
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

from curation.dedup import SEARCH_EF, cosine_pairs, hamming_pairs  # noqa: E402

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


def run_cosine(x: np.ndarray, threshold: float, exact_limit: int | None, threads: int):
    def chunks():
        for a in range(0, len(x), CHUNK):
            yield x[a : a + CHUNK].astype(np.float32)

    base = rss_gb("VmRSS")
    peak_rss_reset()
    stats: dict[str, float] = {"index_bytes": 0.0}
    start, cpu = time.perf_counter(), time.process_time()
    pairs = cosine_pairs(
        chunks, len(x), threshold, exact_limit=exact_limit, threads=threads, stats=stats
    )
    stats["cpu_s"] = time.process_time() - cpu
    return pairs, time.perf_counter() - start, rss_gb() - base, stats


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--n", type=int, default=100_000, help="vectors for the usearch run (default 100k)"
    )
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--plant", type=int, default=1000, help="planted near copies (recall check)")
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument(
        "--exact-sizes", default="5000,10000,20000", help="sizes timed with both searches"
    )
    ap.add_argument("--threads", type=int, default=0, help="usearch threads (0: all cores)")
    ap.add_argument(
        "--phash-n", type=int, default=200_000, help="64-bit hashes for the phash search"
    )
    ap.add_argument("--target", type=int, default=25_000_000, help="projection size")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    print(
        f"machine: {cores} cores, load avg {os.getloadavg()[0]:.1f}; dim {args.dim}, threshold {args.threshold}"
    )

    # 1. Crossover: the exact blockwise search against usearch at small sizes (CPU seconds: on a
    #    shared machine wall time measures the neighbours as much as the code).
    print("\nsize      exact-blockwise (cpu / wall)   usearch-hnsw (cpu / wall)")
    cross = []
    for size in [int(s) for s in args.exact_sizes.split(",") if s]:
        x, _ = make_vectors(size, args.dim, 0)
        _, te, _, se = run_cosine(x, args.threshold, size, args.threads)
        _, tu, _, su = run_cosine(x, args.threshold, 0, args.threads)
        cross.append((size, se["cpu_s"], su["cpu_s"]))
        print(
            f"{size:>8}  {se['cpu_s']:>9.1f} s / {te:>6.1f} s   {su['cpu_s']:>12.1f} s / {tu:>6.1f} s"
        )

    # 2. The usearch path at --n, with planted near copies.
    x, planted = make_vectors(args.n, args.dim, args.plant)
    pairs, t, mem, stats = run_cosine(x, args.threshold, 0, args.threads)
    found = set(zip(pairs.i.tolist(), pairs.j.tolist(), strict=True))
    recall = len(found & planted) / max(1, len(planted))
    n, cpu = len(x), stats["cpu_s"]
    index_gb = stats["index_bytes"] / 1024**3
    print(
        f"\nusearch (f16, connectivity 16, expansion add 128 / search {SEARCH_EF}), {n} vectors ({x.nbytes / 1024**3:.2f} GB fp16):"
    )
    print(f"  wall {t:.0f} s (add {stats['add_s']:.0f} s + search {stats['search_s']:.0f} s), CPU {cpu:.0f} s "
          f"= {n / cpu:.0f} vectors per CPU-second")  # fmt: skip
    print(f"  index {index_gb:.3f} GB ({stats['index_bytes'] / n:.0f} B/vector), peak RSS growth {mem:.2f} GB "
          f"(index + one fp32 chunk of {CHUNK}); planted recall {recall:.3f}, {len(found - planted)} other pairs")  # fmt: skip

    # 3. Hamming (phash) search at --phash-n.
    rng = np.random.default_rng(1)
    h = rng.integers(0, 2**63, size=args.phash_n, dtype=np.uint64)
    c0 = time.process_time()
    hamming_pairs(h, 8, exact_limit=args.phash_n)
    c1 = time.process_time()
    hamming_pairs(h, 8, exact_limit=0, threads=args.threads)
    c2 = time.process_time()
    print(
        f"\nphash, {args.phash_n} hashes: exact blockwise {c1 - c0:.1f} CPU-s, usearch {c2 - c1:.1f} CPU-s"
    )

    # 4. Projections from CPU seconds (HNSW ~ N log N; exact ~ N^2; memory ~ N).
    big = args.target
    cpu_big = cpu * (big / n) * (math.log(big) / math.log(n))
    if cross:
        size, ce, cu = cross[-1]
        print(
            f"\nexact blockwise projected: {big:,} → {ce * (big / size) ** 2 / 3600 / 64:,.0f} h on 64 cores"
        )
        print(f"crossover (exact = usearch) ≈ {size * cu / ce:,.0f} vectors (from the {size} pair)")
    print(f"usearch projected for {big:,}: {cpu_big / 3600:,.0f} CPU-hours "
          f"(≈ {cpu_big / 3600 / 64:.1f} h on 64 cores), index ≈ {stats['index_bytes'] / n * big / 1024**3:.0f} GB "
          f"(fp16 vectors alone {big * args.dim * 2 / 1024**3:.0f} GB)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
