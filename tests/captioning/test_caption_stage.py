"""The caption stage through Ray: run_stage integration, the CLI, and crash safety."""

import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pyarrow.parquet as pq
import pytest

from captioning.run import caption_store
from pipeline.cli import main
from pipeline.manifest import verify

SETTINGS = dict(batch_size=1, max_new_tokens=48)  # a few tenths of a second per 2-image shard


def assert_captioned_exactly_once(store, tag):
    """Every ok image of every shard has exactly one caption row, in its shard, in order."""
    all_keys = []
    for shard in store.shards():
        table = pq.read_table(store.url("captions", tag, f"{shard}.parquet"))
        assert table["key"].to_pylist() == store.ok_keys(shard)
        assert table["error"].null_count == table.num_rows
        all_keys += table["key"].to_pylist()
    assert len(all_keys) == len(set(all_keys)) == sum(len(store.ok_keys(s)) for s in store.shards())
    report = verify(store)
    assert report["ok"] and not report["problems"], report["problems"]


def wait_for(predicate, timeout=150.0, what="condition"):
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_cli_caption_runs_ray_actors_resumes_and_refuses_mixed_settings(
    photo_store, ray_local, capsys
):
    args = ["caption", "--store", photo_store.root, "--batch-size", "2"]
    args += ["--max-new-tokens", "3", "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "captions/tiny: 2 shard(s) done, 0 skipped as already done, 0 failed; 6 rows" in out
    assert pq.read_table(photo_store.url("captions/tiny"))["n_tokens"].to_pylist() == [3] * 6
    assert_captioned_exactly_once(photo_store, "tiny")
    manifest = photo_store.read_manifest()
    assert set(manifest["stages"]["captions/tiny"]["shards"]) == {"000000", "000001"}
    assert manifest["stages"]["captions/tiny"]["settings"]["max_new_tokens"] == 3
    # The library call with the same settings resumes: nothing left to do.
    again = caption_store(photo_store.root, "tiny", batch_size=4, max_new_tokens=3, progress=False)
    assert again.ok and again.done == [] and again.skipped == photo_store.shards()
    assert main([*args, "--prompt", "Say something else."]) == 2
    assert (
        "captions/tiny was started with other settings (prompt differ)" in capsys.readouterr().err
    )


def our_actors() -> list[psutil.Process]:
    """Caption actors of this test process's own Ray (its descendants), never anyone else's."""
    procs = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "_Host" in " ".join(p.cmdline()):
                procs.append(p)
        except psutil.Error:
            pass
    return procs


@pytest.mark.slow
def test_actor_then_driver_killed_mid_run_then_rerun_captions_everything_exactly_once(
    store_factory, ray_local
):
    store = store_factory(shard_size=2, copies=2)  # 12 photos in 6 shards
    stage = "captions/crash"
    wait_for(lambda: not our_actors(), timeout=30, what="earlier tests' actors to exit")
    # The driver attaches to this session's Ray, as it would to a cluster under `ray job submit`.
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cmd = [sys.executable, "-m", "pipeline.cli", "caption", "--store", store.root, "--tag", "crash"]
    cmd += ["--batch-size", "1", "--max-new-tokens", "48", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # 1. Kill the model actor while it captions the second shard: the runner must retry it.
        wait_for(lambda: store.completed(stage) or proc.poll() is not None, what="the first shard")
        victims = our_actors()
        assert len(victims) == 1
        victims[0].send_signal(signal.SIGKILL)
        n_at_actor_kill = len(store.completed(stage))
        # 2. Kill the driver once a replacement actor has made progress.
        wait_for(
            lambda: len(store.completed(stage)) > n_at_actor_kill or proc.poll() is not None,
            what="progress after the actor died",
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    log = proc.stdout.read().decode()
    assert re.search(r"shard \d{6} attempt 1 failed: worker died", log), log[-2000:]
    # Ray ends the actors a dead driver owned; only then is the store at rest.
    wait_for(lambda: not our_actors(), timeout=60, what="the dead driver's actors to exit")
    before = store.completed(stage)
    assert proc.returncode == -signal.SIGKILL and 2 <= len(before) < 6, log[-2000:]

    # 3. Run again: the shards done are skipped, the rest are captioned, nothing twice.
    summary = caption_store(store.root, "tiny", tag="crash", progress=False, **SETTINGS)
    assert summary.ok and sorted(summary.skipped) == sorted(before)
    assert sorted(summary.done + summary.skipped) == store.shards()
    after = store.completed(stage)
    assert all(after[s] == before[s] for s in before)  # done shards were not redone
    assert_captioned_exactly_once(store, "crash")
