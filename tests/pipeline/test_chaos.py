"""Chaos: SIGKILL a random command (ingest, caption, score, features) at a random moment, several
times, then run each to the end: every key is in the store exactly once, every stage shard holds
exactly the ok keys of its image shard, and `manifest verify` finds nothing wrong.

The commands run as real processes (`alphaset …` through `pipeline.cli.main`), forked from a
forkserver that imported the packages once, so a kill costs no start-up time. The seed is printed;
``ALPHASET_CHAOS_SEED`` replays a run.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import random

import numpy as np
import polars as pl
import pytest
from PIL import Image

from pipeline.manifest import verify
from pipeline.store import Store

N_IMAGES, SHARD_SIZE, KILLS = 8, 2, 4


def _run(argv: list[str], reads: str) -> None:
    import pipeline.store
    from pipeline.cli import main

    os.environ["ALPHASET_STATUS_READS"] = reads
    if reads == "index":  # every stage keeps an index object, so the seals are exercised
        pipeline.store.INDEX_MIN_RECORDS = 1
    os._exit(main(argv))


def commands(src: str, store: str) -> dict[str, list[str]]:
    quiet = ["--store", store, "--no-progress"]
    stage = [*quiet, "--no-ray"]
    return {
        "ingest": ["ingest", "folder", src, *quiet, "--shard-size", str(SHARD_SIZE)],
        "caption": ["caption", *stage, "--model", "tiny", "--max-new-tokens", "4"],
        "score": ["score", *stage, "--clip", "tiny", "--aesthetic", "none"],
        "features": [
            "features",
            *stage,
            "--resolution",
            "256",
            "--t5",
            "tiny",
            "--vae",
            "tiny",
            "--captions",
            "tiny",
        ],  # fmt: skip
    }


@pytest.fixture(scope="module")
def forkserver():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(
        ["pipeline.cli", "captioning.run", "curation.score", "training.features"]
    )
    return ctx


@pytest.mark.parametrize("reads", ["list", "index"])
def test_random_sigkills_leave_every_key_exactly_once(tmp_path, forkserver, reads):
    """``reads``: how status is read — listing the records (the local default) or trusting
    sealed indexes (the object-store default): kills leave writers' markers behind."""
    seed = int(os.environ.get("ALPHASET_CHAOS_SEED", random.SystemRandom().randrange(1 << 30)))
    print(f"chaos seed {seed} (ALPHASET_CHAOS_SEED={seed} replays it)")
    rng = random.Random(seed)
    src = tmp_path / "src"
    src.mkdir()
    pixels = np.random.default_rng(seed)
    for i in range(N_IMAGES):
        arr = pixels.integers(0, 255, (40 + 3 * i, 56, 3), dtype="uint8")
        Image.fromarray(arr).save(src / f"img{i:02d}.png")
    root = str(tmp_path / "store")
    cmds = commands(str(src), root)

    def start(name: str):
        p = forkserver.Process(target=_run, args=(cmds[name], reads), name=name)
        p.start()
        return p

    # 1. Kill a random command at a random moment, several times (ingest first: stages need shards).
    kills = []
    for i in range(KILLS):
        name = "ingest" if i == 0 else rng.choice(list(cmds))
        p = start(name)
        delay = rng.uniform(0.5, 6.0)  # start-up, model load or mid-shard
        p.join(delay)
        if p.is_alive():
            p.kill()  # SIGKILL: no clean-up, no finally blocks
            p.join()
            kills.append(f"{name}@{delay:.1f}s")
        else:
            kills.append(f"{name} finished ({p.exitcode})")
    print("chaos:", ", ".join(kills))

    # 2. Run every command to the end, as a user re-running them would.
    for name in cmds:
        p = start(name)
        p.join(300)
        assert p.exitcode == 0, f"{name} exited {p.exitcode} after {kills}"

    # 3. Every key exactly once, every stage aligned with the image shards (read by listing).
    store = Store(root, reads="list")
    meta = pl.read_parquet(store.url("meta"))
    assert meta.height == N_IMAGES and meta["key"].n_unique() == N_IMAGES, kills
    assert (meta["status"] == "ok").all()
    stages = store.stages()
    assert {s.split("/")[0] for s in stages} >= {"captions", "scores", "embeddings", "features"}
    for stage in stages:
        assert sorted(store.completed(stage)) == store.shards(), (stage, kills)
        if not stage.startswith("features/"):
            keys = pl.read_parquet(store.url(stage))["key"]
            assert keys.len() == N_IMAGES and keys.n_unique() == N_IMAGES, (stage, kills)
    report = verify(Store(root, reads=reads))  # also: no sealed index out of date
    assert report["ok"], (report["problems"], kills)
    assert not [w for w in report["warnings"] if "_index" in w["path"]], report["warnings"]
    if reads == "index":  # every writer ran to its end last: no marker left, every index sealed
        for stage in ["ingest", *stages]:
            folder = store.status_dir(stage)
            assert not os.path.exists(os.path.join(folder, "_writing.json")), (stage, kills)
            with open(os.path.join(folder, "_index.json.gz"), "rb") as f:
                assert json.loads(gzip.decompress(f.read()))["sealed"] is True, (stage, kills)
    stale = [w for w in report["warnings"] if "temporary" in w["message"]]
    assert not stale, stale
