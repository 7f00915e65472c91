"""Two CPU workers (gloo) through Ray Train's TorchTrainer run the same loop as one process."""

from __future__ import annotations

import json

import pytest

from training.checkpoint import read_state
from training.config import load_config
from training.launch import train_distributed

pytest_plugins = ["conftest_train"]


@pytest.mark.slow
def test_two_ddp_workers_stay_in_sync_on_disjoint_samples(kit, train_store, tmp_path, ray_local):
    stage = kit.tiny_stage("ddp", steps=3, save_every=3)
    run = kit.tiny_run(train_store, tmp_path / "runs", record_keys=True)
    cfg = load_config(str(kit.write_config(tmp_path / "s.toml", run, [stage])))
    finals = train_distributed(cfg, workers=2, cpus_per_worker=1, progress=False)

    state = read_state(finals["ddp"])
    assert state["world_size"] == 2 and state["step"] == 3
    # Every rank checksummed its parameters at the checkpoint: identical after 3 steps.
    sums = state["param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert [d["rank"] for d in state["data"]] == [0, 1] and len(state["rng"]) == 2
    # The ranks read disjoint samples (3 steps × 2 < the 8 samples each rank owns per epoch).
    keys = {}
    for rank in (0, 1):
        lines = (
            (tmp_path / "runs" / "t" / "ddp" / "keys" / f"rank-{rank}.jsonl")
            .read_text()
            .splitlines()
        )
        keys[rank] = [k for line in lines for k in json.loads(line)["keys"]]
        assert len(keys[rank]) == 6 and len(set(keys[rank])) == 6
    assert not set(keys[0]) & set(keys[1])
    # global batch = 2 per worker × 2 workers
    metrics = [
        json.loads(x)
        for x in (tmp_path / "runs" / "t" / "ddp" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == [1, 2, 3]


@pytest.mark.slow
def test_lcm_front_end_on_two_ddp_workers(kit, train_store, trained_run, tmp_path, ray_local):
    """`alphaset distill lcm --workers 2`: the student (with its guidance hook), the teacher and
    the EMA target on two gloo ranks stay identical; checkpoints written once by rank 0."""
    from pipeline.cli import main

    out = tmp_path / "lcm"
    code = main([
        "distill", "lcm", "--teacher", str(trained_run / "align"), "--store", train_store,
        "--features", kit.TAG, "--steps", "2", "--batch-size", "2", "--lr", "1e-3",
        "--workers", "2", "--out", str(out), "--quiet",
    ])  # fmt: skip
    assert code == 0
    state = read_state(str(out / "lcm" / "checkpoints" / "step-2"))
    assert state["world_size"] == 2 and state["objective"] == "lcm"
    sums = state["param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
