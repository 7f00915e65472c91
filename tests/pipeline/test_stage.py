"""The shard-stage runner with a real (trivial) worker: skip done shards, retry dead actors,
report failures, resume."""

import os
import sys

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


def test_workers_beyond_the_cluster_are_not_started(ray_local, caplog):
    """Actors the cluster cannot place would wait forever, with the shards handed to them."""
    from pipeline.stage import fitting_workers

    # the session's local Ray: 2 CPUs, no GPU
    assert fitting_workers(1, 1.0, 0.0) == 1
    with caplog.at_level("WARNING", logger="pipeline.stage"):
        assert fitting_workers(8, 1.0, 0.0) == 2
    assert "holds 2 worker(s)" in caplog.text
    assert fitting_workers(8, 0.5, 0.0) == 4
    with pytest.raises(UserError, match=r"2 CPU\(s\) and 0 GPU\(s\): not enough for one worker"):
        fitting_workers(1, 1.0, 1.0)


def test_ray_stage_with_more_workers_than_cpus_finishes(store, ray_local):
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    sp = spec(store)
    sp.workers, sp.cpus_per_worker = 3, 2.0  # one fits the 2-CPU cluster
    s = run_stage(store, sp, progress=False)
    assert sorted(s.done) == ["000000", "000001", "000002"] and s.ok
