"""Benchmark: what reading a big store's state costs on S3 — requests and seconds of `manifest
show`, of a no-op stage run and of one manifest refresh, through the per-stage status index
(sealed, as every writer leaves it when it ends: see `pipeline.store`).

Store: --shards image shards, each done by 8 stages (two caption tags, scores, embeddings, dedup,
two feature resolutions, edges): 9 status folders of --shards records each, with realistic
records (~600 bytes), and the output files of the stage that the no-op run runs (a run checks
that each done shard's output is there with its recorded size), on a local moto S3 endpoint. The endpoint is moto's server in a child
process; its request log is what is counted (every HTTP request any client sends). Listings
return 1,000 keys a page as S3 does (moto's default is 100: MOTO_S3_DEFAULT_MAX_KEYS=1000).

Building the store over HTTP would take hours on moto (~150 PUT/s on 2 shared cores), so the
child process writes the records straight into moto's in-memory backend and the bench writes the
first status indexes from the records it generated (each under the listing fingerprint of its
record, exactly what a first refresh would write), sealed as a writer of each stage seals them
when it ends. The first build over HTTP — every record read once, concurrently — is measured
separately on a --first-build-shards store.

    .venv/bin/python bench/status.py --shards 25000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUCKET = "bench-status"
STAGES = [
    "captions/llava-1.5-7b",
    "captions/sharecaptioner",
    "scores/clip-vit-l-14",
    "embeddings/clip-vit-l-14",
    "scores/dedup",
    "features/t5-v1_1-xxl_sd-vae-ft-ema_512_llava-1.5-7b",
    "features/t5-v1_1-xxl_sd-vae-ft-ema_1024_llava-1.5-7b",
    "edges/hed",
]
OUTPUT_BYTES = 1000  # the benchmarked stage's output files exist, with this (recorded) size
REQUEST_LINE = re.compile(r'"(GET|PUT|HEAD|POST|DELETE) ')


def record(stage: str, shard: str) -> dict:
    """A status record shaped like the ones the stage workers write."""
    rec = {
        "stage": stage,
        "shard": shard,
        "tool_version": "0.1.0",
        "time": "2026-11-30T06:00:00+00:00",
        "rows": 1000,
        "ok": 997,
        "errors": 3,
        "errors_by_reason": {"truncated image": 2, "not an image": 1},
        "checksum": f"{hash((stage, shard)) & (2**256 - 1):064x}",
        "seconds": 41.7,
    }
    if stage == "ingest":
        rec.update(source="sam", meta_checksum=rec["checksum"], image_bytes=412_000_000,
                   meta_bytes=180_000)  # fmt: skip
    else:
        rec.update(output=f"{shard}.parquet", output_bytes=OUTPUT_BYTES, model=stage.split("/")[1])
    return rec


def _records(shards: int):
    for stage in ("ingest", *STAGES):
        for i in range(shards):
            shard = f"{i:06d}"
            yield stage, shard, record(stage, shard)


# ---- the S3 endpoint (child process) ------------------------------------------------------------
def serve(port: int, shards: int, prefix: str) -> None:
    """Start moto on ``port``, put the synthetic records in its backend, say READY, serve."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=True)
    server.start()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    backend.create_bucket(BUCKET, "us-east-1")
    for stage, shard, rec in _records(shards):
        key = f"{prefix}/_status/{stage}/{shard}.json"
        backend.put_object(BUCKET, key, json.dumps(rec, indent=1, sort_keys=True).encode())
    # The run stage checks that each done shard's output file is there with its recorded size.
    for i in range(shards):
        backend.put_object(BUCKET, f"{prefix}/{STAGES[0]}/{i:06d}.parquet", b"\0" * OUTPUT_BYTES)
    for stage in STAGES:
        cfg = {"stage": stage, "settings": {"model": stage}, "tool_version": "0.1.0",
               "created": "2026-11-30T06:00:00+00:00"}  # fmt: skip
        backend.put_object(
            BUCKET, f"{prefix}/_status/{stage}/config.json", json.dumps(cfg).encode()
        )
    print("READY", flush=True)
    while True:
        time.sleep(3600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Endpoint:
    """The moto child process and its request log."""

    def __init__(self, shards: int, prefix: str, log: Path):
        self.port = _free_port()
        self.log = log
        env = {**os.environ, "MOTO_S3_DEFAULT_MAX_KEYS": "1000"}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(self.port), "--shards", str(shards),
             "--prefix", prefix],
            stdout=subprocess.PIPE, stderr=open(log, "w"), env=env, text=True,
        )  # fmt: skip
        for line in self.proc.stdout:  # moto says where it listens, then the records are in
            if line.strip() == "READY":
                break
        else:
            raise RuntimeError(f"moto did not start: {log.read_text()[-2000:]}")
        self.url = f"http://127.0.0.1:{self.port}"

    def requests(self) -> int:
        with open(self.log) as f:
            return sum(1 for line in f if REQUEST_LINE.search(line))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def measure(endpoint: Endpoint, what: str, fn, results: list) -> object:
    time.sleep(0.3)  # let the server flush its log
    before = endpoint.requests()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    time.sleep(0.3)
    n = endpoint.requests() - before
    results.append({"what": what, "seconds": round(seconds, 2), "requests": n})
    print(f"{what:<58} {seconds:8.2f} s {n:8d} requests", flush=True)
    return out


class _NeverCalled:
    """A stage worker for a no-op run: every shard is done, so it must never run."""

    def __init__(self):
        pass

    def __call__(self, shard: str) -> dict:
        raise AssertionError(f"shard {shard} was not skipped")


@contextlib.contextmanager
def endpoint(shards: int, name: str, tmp: Path):
    """A moto endpoint holding a store of ``shards`` shards at ``s3://BUCKET/name``, the AWS
    variables pointing at it: yields (endpoint, store URL)."""
    from pipeline.store import Store

    t = time.perf_counter()
    ep = Endpoint(shards, name, tmp / f"moto-{name}.log")
    print(f"endpoint with {shards} shards x {1 + len(STAGES)} status folders ready in "
          f"{time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip
    os.environ.update(
        AWS_ENDPOINT_URL=ep.url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
        # a new endpoint per store: fsspec caches filesystems by their options, not the env
        ALPHASET_STORAGE_OPTIONS=json.dumps({"endpoint_url": ep.url}),
    )  # fmt: skip
    root = f"s3://{BUCKET}/{name}"
    try:
        Store(root).create()
        yield ep, root
    finally:
        ep.stop()


def big_store(ep: Endpoint, root: str, n: int, results: list, only_noop: bool = False) -> None:
    """The measurements on the big store, after its first indexes are written."""
    from pipeline import fs, manifest
    from pipeline.stage import StageSpec, run_stage
    from pipeline.store import Store, _StageIndex

    # The first indexes, from the generated records (see the module docstring), sealed the way
    # a writer of each stage seals them when it ends (`Store.writing`).
    st = Store(root)
    generated: dict[str, dict] = {}
    for stage, shard, rec in _records(n):
        generated.setdefault(stage, {})[shard] = rec
    marks = {stage: fs.listing(st.status_dir(stage)) for stage in generated}

    def set_up() -> None:
        with contextlib.ExitStack() as writers:
            for stage, recs in generated.items():
                writers.enter_context(st.writing(stage))
                # what this writer's own listing would have read: the generated records
                st._indexes[stage] = _StageIndex(
                    records=recs,
                    marks={s: marks[stage][f"{s}.json"] for s in recs},
                    trusted=True,
                )
            st.refresh_manifest()

    measure(ep, f"manifest write + sealed index upload ({n} shards x 9)", set_up, results)
    stage = STAGES[0]
    if not only_noop:
        measure(ep, "manifest show (fresh process state)", lambda: manifest.show(Store(root)),
                results)  # fmt: skip
    spec = StageSpec(stage=stage, worker_cls=_NeverCalled, worker_kwargs={},
                     settings={"model": stage})  # fmt: skip
    summary = measure(ep, f"no-op stage run ({stage})",
                      lambda: run_stage(Store(root), spec, progress=False, use_ray=False),
                      results)  # fmt: skip
    assert len(summary.skipped) == n and not summary.done, summary.lines()
    if only_noop:
        return
    measure(ep, "one full refresh (all 9 stages, fresh process state)",
            lambda: Store(root).refresh_manifest(), results)  # fmt: skip
    # A run of that stage in progress: its marker is up, its workers wrote 10 records; the
    # driver's refresh of its own stage lists it and reads just those 10.
    st = Store(root)
    st.completed(stage)
    with st.writing(stage) as run:
        run.dispatch()
        for i in range(10):
            Store(root).write_status(stage, f"{i:06d}", {"rows": 999, "ok": 999, "errors": 0})
        measure(ep, "refresh of a running stage after 10 new records",
                lambda: st.refresh_manifest(stages=[stage]), results)  # fmt: skip
        run.finish()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=25_000)
    p.add_argument("--first-build-shards", type=int, default=300)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--only-noop", action="store_true", help="skip show and the refreshes")
    p.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--prefix", default="store", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve is not None:
        serve(args.serve, args.shards, args.prefix)
        return 0

    import tempfile

    from pipeline.store import Store

    results: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-status-"))
    with endpoint(args.first_build_shards, "first", tmp) as (ep, root):
        measure(ep, f"first index build + manifest ({args.first_build_shards} shards x 9)",
                lambda: Store(root).refresh_manifest(), results)  # fmt: skip
    with endpoint(args.shards, "big", tmp) as (ep, root):
        big_store(ep, root, args.shards, results, args.only_noop)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"shards": args.shards, "results": results}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
