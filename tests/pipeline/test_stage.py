"""The shard-stage runner with a real (trivial) worker: skip done shards, retry dead actors,
report failures, resume."""

import os
import sys
import time

import pyarrow as pa
import pytest

from pipeline import fs
from pipeline.errors import UserError
from pipeline.ingest.folder import ingest_folder
from pipeline.stage import StageSpec, run_stage
from pipeline.store import Store, StoreError


class KeyLengthWorker:
    """Writes len(key) per ok key. ``die_once`` makes the process exit on its first try of a shard
    (a real actor death); ``fail`` raises on a shard every time."""

    def __init__(
        self, store: str, die_once: str | None = None, fail: str | None = None, marker: str = ""
    ):
        self.store = Store(store)
        self.die_once, self.fail, self.marker = die_once, fail, marker

    def __call__(self, shard: str) -> dict:
        if shard == self.fail:
            raise RuntimeError(f"cannot process {shard}")
        if shard == self.die_once and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(1)
        keys = self.store.ok_keys(shard)
        table = pa.table({"key": keys, "n": [len(k) for k in keys], "error": [None] * len(keys)})
        stage = "scores/keylen"
        checksum = fs.write_parquet(self.store.url(stage, f"{shard}.parquet"), table)
        return self.store.write_status(
            stage, shard, {"rows": len(keys), "ok": len(keys), "errors": 0, "checksum": checksum}
        )


@pytest.fixture()
def store(photos_dir, tmp_path):
    st = Store(str(tmp_path / "store"))
    ingest_folder(st, str(photos_dir), progress=False, shard_size=2)
    return st


def spec(store, **kw):
    return StageSpec(
        stage="scores/keylen",
        worker_cls=KeyLengthWorker,
        worker_kwargs={"store": store.root, **kw},
        settings={"v": 1},
        workers=2,
    )


def test_local_run_then_skip(store):
    s = run_stage(store, spec(store), progress=False, use_ray=False)
    assert s.done == ["000000", "000001", "000002"] and s.rows == 6 and s.ok
    again = run_stage(store, spec(store), progress=False, use_ray=False)
    assert again.done == [] and again.skipped == ["000000", "000001", "000002"]
    assert store.refresh_manifest()["stages"]["scores/keylen"]["shards"].keys() == {
        "000000",
        "000001",
        "000002",
    }


def test_ray_retries_a_dead_actor_and_reports_a_failing_shard(store, ray_local, tmp_path):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    sp = spec(store, die_once="000001", fail="000002", marker=str(tmp_path / "died"))
    s = run_stage(store, sp, progress=False)
    assert os.path.exists(tmp_path / "died")
    assert sorted(s.done) == ["000000", "000001"]
    assert list(s.failed) == ["000002"] and "cannot process 000002" in s.failed["000002"]
    assert s.retries >= 3  # one for the death, two for the failing shard
    assert not store.status("scores/keylen", "000002")


def test_settings_change_is_refused(store):
    run_stage(store, spec(store), progress=False, use_ray=False)
    other = spec(store)
    other.settings = {"v": 2}
    with pytest.raises(StoreError, match="other settings"):
        run_stage(store, other, progress=False, use_ray=False)


@pytest.mark.parametrize(
    "argv",
    [
        ["caption", "--store", "s"],
        ["score", "--store", "s"],
        ["features", "--store", "s", "--resolution", "256"],
    ],
    ids=["caption", "score", "features"],
)
def test_stage_commands_share_the_placement_flags(argv, photos_dir, tmp_path, capsys):
    """Every shard stage places its workers with the same flags, defaults and meanings."""
    from pipeline.cli import build_parser
    from pipeline.ingest.folder import ingest_folder
    from pipeline.stage import stage_args

    store = str(tmp_path / "s")
    ingest_folder(store, photos_dir, shard_size=1, progress=False)  # --shards are checked
    argv = [store if a == "s" else a for a in argv]
    parser = build_parser()
    assert stage_args(parser.parse_args(argv)) == {
        "workers": 1,
        "gpus_per_worker": None,  # 1 per worker when the cluster has GPUs (place_workers)
        "cpus_per_worker": 1.0,
        "max_retries": 2,
        "shards": None,
        "ray_address": None,
        "use_ray": True,
        "progress": True,
    }
    flags = "--workers 4 --gpus-per-worker 0.5 --cpus-per-worker 8 --max-retries 0"
    flags += " --shards 000001,000003,000001 --ray-address 10.0.0.1:6379 --no-ray --no-progress"
    assert stage_args(parser.parse_args(argv + flags.split())) == {
        "workers": 4,
        "gpus_per_worker": 0.5,
        "cpus_per_worker": 8.0,
        "max_retries": 0,
        "shards": ["000001", "000003"],
        "ray_address": "10.0.0.1:6379",
        "use_ray": False,
        "progress": False,
    }
    # bad values are refused at parse time (before any file is written or Ray starts)
    from pipeline.cli import main

    for bad, why in ((",", "no shard names"), ("999999", "not ingested"), ("12", "six digits")):
        assert main(argv + ["--shards", bad]) == 2
        assert why in capsys.readouterr().err
    from pipeline.store import StoreError

    with pytest.raises(StoreError, match="not ingested in .*: 999999 "):
        stage_args(parser.parse_args(argv + ["--shards", "999999"]))
    assert not (tmp_path / "s" / "_status" / argv[0]).exists()


def test_place_workers_without_ray_follows_this_machine():
    import torch

    from pipeline.cluster import place_workers

    assert place_workers(0.25, None, use_ray=False) == 0.25
    assert place_workers(None, None, use_ray=False) == (1.0 if torch.cuda.is_available() else 0.0)
    with pytest.raises(UserError, match="--gpus-per-worker must be >= 0"):
        place_workers(-1, None, use_ray=True)  # before any Ray starts


def test_workers_beyond_the_cluster_wait_and_none_placeable_fails(
    store, ray_local, caplog, monkeypatch
):
    """More workers than the cluster holds: all are asked for, the stage runs on those placed
    (with a warning) and finishes. Workers no node can hold: an error after the placement
    timeout (on a cluster an autoscaler may add a node), not a wait forever."""
    import ray.cloudpickle

    from pipeline.errors import UserError
    from pipeline.stage import workers_that_fit

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # the session's local Ray: 2 CPUs, no GPU
    assert workers_that_fit(1.0, 0.0) == (2, "1 node(s), 2 CPU(s), 0 GPU(s)")
    assert workers_that_fit(0.5, 0.0)[0] == 4 and workers_that_fit(1.0, 1.0)[0] == 0
    sp = spec(store)
    sp.workers = 8
    with caplog.at_level("WARNING", logger="pipeline.stage"):
        s = run_stage(store, sp, progress=False)
    assert sorted(s.done) == ["000000", "000001", "000002"] and s.ok
    assert (
        "--workers 3: the Ray cluster (1 node(s), 2 CPU(s), 0 GPU(s)) holds 2 worker(s) at once; the other 1 wait"
        in caplog.text
    )
    other = spec(store)
    other.stage, other.gpus_per_worker, other.placement_timeout = "scores/gpu", 1.0, 1.0
    with pytest.raises(UserError, match=r"could hold one worker with --cpus-per-worker 1 "
                       r"--gpus-per-worker 1 for 1 s"):  # fmt: skip
        run_stage(store, other, progress=False)
    # on a Ray this process started itself no node will ever join: fail at once
    monkeypatch.setattr("pipeline.cluster._embedded", True)
    other.placement_timeout = 3600.0
    with pytest.raises(UserError, match=r"the embedded local Ray \(1 node\(s\), 2 CPU\(s\), 0 GPU"):
        run_stage(store, other, progress=False)


class BrokenModelWorker:
    def __init__(self, store: str):
        raise RuntimeError("no weights in /models/missing")

    def __call__(self, shard: str) -> dict:
        raise AssertionError("never handed a shard: it never loaded")


def test_workers_that_cannot_load_fail_the_shards_after_bounded_tries(store, ray_local):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    sp = StageSpec(
        stage="scores/broken",
        worker_cls=BrokenModelWorker,
        worker_kwargs={"store": store.root},
        settings={},
        workers=2,
        max_retries=1,
    )
    s = run_stage(store, sp, progress=False)
    assert not s.done and sorted(s.failed) == ["000000", "000001", "000002"]
    assert (
        "worker failed to start: RuntimeError: no weights in /models/missing" in s.failed["000000"]
    )


class SlowStartWorker(KeyLengthWorker):
    """The first instance takes ``load_seconds`` to load its model; the others load at once."""

    def __init__(self, store: str, marker: str, load_seconds: float):
        super().__init__(store)
        if not os.path.exists(marker):
            open(marker, "w").close()
            time.sleep(load_seconds)


def test_shards_go_only_to_workers_that_have_loaded(store, ray_local, tmp_path):
    """One worker still loading must not sit on a shard: the ready one does them all."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    sp = spec(store)
    sp.worker_cls = SlowStartWorker
    sp.worker_kwargs.update(marker=str(tmp_path / "slow"), load_seconds=120.0)
    start = time.monotonic()
    s = run_stage(store, sp, progress=False)
    assert sorted(s.done) == ["000000", "000001", "000002"] and s.ok
    assert time.monotonic() - start < 60  # not waiting for the slow one's load


def test_ray_stage_with_more_workers_than_cpus_finishes(store, ray_local):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    sp = spec(store)
    sp.workers, sp.cpus_per_worker = 3, 2.0  # one fits the 2-CPU cluster
    s = run_stage(store, sp, progress=False)
    assert sorted(s.done) == ["000000", "000001", "000002"] and s.ok
