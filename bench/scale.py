"""Benchmark: one shard stage (`alphaset score` with the tiny random CLIP) on a Ray cluster of 1, 2
and 3 nodes of this machine, through the elastic actor pool of `pipeline.stage`.

Each node is a separate raylet with ``--cpus-per-node`` CPUs (``ray.cluster_utils.Cluster``: the
same processes `ray start` launches, on one host); the stage asks for one worker per CPU of the
cluster. The store is ingested once; each cluster size scores it under its own tag, so every run
does the same work. Reported per run: the stage's wall time (actor start and model load
included), the steady rate (rows between the first and the last shard completion, divided by that
time), that rate per node, and the driver's own CPU seconds per shard (the scheduling loop,
manifest refreshes, Ray calls) — the driver's load, which a 64-GPU run multiplies.

    .venv/bin/python bench/scale.py --images 192 --shard-size 4 --nodes 1,2,3

What it can and cannot show on a small machine: every "node" shares the same cores, so beyond
the machine's core count the steady rate cannot grow — it measures the pool's overhead and its
use of every node, not hardware scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.photos import photo_store  # noqa: E402


def run_on(nodes: int, cpus: int, store, tag: str) -> dict:
    """Start a ``nodes``-node cluster, score the store under ``tag``, stop the cluster."""
    import ray
    from ray.cluster_utils import Cluster

    from curation.score import ScoreConfig, score_store

    t0 = time.perf_counter()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    started = time.perf_counter() - t0
    try:
        cfg = ScoreConfig(
            clip="tiny",
            tag=tag,
            aesthetic="none",
            batch_size=16,
            decode_workers=1,
            workers=nodes * cpus,
            cpus_per_worker=1.0,
            gpus_per_worker=0.0,
        )
        cpu0 = time.process_time()
        summary = score_store(store, cfg, progress=False)
        driver_cpu = time.process_time() - cpu0
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert summary.ok, summary.lines()
    # completion times: the status records' modification times (written last, by rename)
    folder = Path(store.status_dir(f"scores/{tag}"))
    done = store.completed(f"scores/{tag}")
    ends = sorted((os.stat(folder / f"{s}.json").st_mtime, r["rows"]) for s, r in done.items())
    span = ends[-1][0] - ends[0][0]
    steady_rows = sum(rows for _, rows in ends[1:])
    steady = steady_rows / span if span > 0 else float("nan")
    return {
        "nodes": nodes,
        "workers": nodes * cpus,
        "cluster_start_s": round(started, 1),
        "stage_s": round(summary.seconds, 1),
        "rows": summary.rows,
        "shards": len(summary.done),
        "stage_rows_per_s": round(summary.rows / summary.seconds, 2),
        "steady_rows_per_s": round(steady, 2),
        "steady_rows_per_s_per_node": round(steady / nodes, 2),
        "driver_cpu_s": round(driver_cpu, 2),
        "driver_cpu_s_per_shard": round(driver_cpu / max(len(summary.done), 1), 3),
        "retries": summary.retries,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--shard-size", type=int, default=4)
    ap.add_argument("--nodes", default="1,2,3", help="cluster sizes to run, in order")
    ap.add_argument("--cpus-per-node", type=int, default=1)
    ap.add_argument(
        "--work", default=None, help="folder for photos and store (default: a temp dir)"
    )
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway cluster on loopback
    os.environ.setdefault("ALPHASET_CACHE", tempfile.mkdtemp(prefix="scale-cache-"))
    work = Path(args.work or tempfile.mkdtemp(prefix="scale-"))
    store = photo_store(work, args.images, args.shard_size)
    from curation.models import resolve_clip

    resolve_clip("tiny")  # build the tiny CLIP once, outside the timed runs
    load = os.getloadavg()[0]
    results = []
    for n in (int(x) for x in args.nodes.split(",")):
        results.append(run_on(n, args.cpus_per_node, store, f"scale{n}"))
        print(json.dumps(results[-1]), flush=True)
    print(f"load before: {load:.2f}, after: {os.getloadavg()[0]:.2f}; cores: {os.cpu_count()}")
    base = results[0]["steady_rows_per_s"]
    for r in results:
        print(
            f"{r['nodes']} node(s), {r['workers']} worker(s): stage {r['stage_s']} s "
            f"({r['stage_rows_per_s']} rows/s incl. start), steady {r['steady_rows_per_s']} rows/s "
            f"= {r['steady_rows_per_s_per_node']} per node ({r['steady_rows_per_s'] / base:.2f}× "
            f"1 node); driver {r['driver_cpu_s_per_shard']} CPU-s/shard"
        )


if __name__ == "__main__":
    main()
